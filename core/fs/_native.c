/*
 * lamina.fs._native: the apply engine's fast path for plain entries.
 *
 * lamina.fs.apply drives a layer apply in Python; for runs of ordinary entries (regular files and symlinks
 * in one directory, already whole in the decompressed buffer) it hands the buffer to run() below, which
 * parses their headers, writes them with openat/symlinkat relative to the directory fd Python resolved,
 * and records them exactly as the Python path would. run() only takes entries it fully understands: a
 * header it cannot parse strictly, a PAX key it does not know how to apply (xattrs, sparse files), any
 * other entry type, a whiteout, a name with "..", a name that already exists, an entry in another
 * directory or one that does not fit in the buffer stops it, and Python applies that entry with its
 * full rules (and raises the proper error when the input is bad). So this file holds no policy of its
 * own beyond "when in doubt, give the entry back".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define BLOCK 512
#define MAX_NAME 4096
#define NAME_MAX_BYTES 255 /* one component of a name: lamina.tar.format.NAME_MAX */
#define MAX_SECONDS 9223372035LL /* seconds whose nanoseconds still fit in 64 bits */
#define MAX_ID 4294967294LL      /* uid_t/gid_t values; (uid_t)-1 means "unchanged" to chown */

enum { ST_SLOW = 0, ST_PARENT = 1, ST_OWNER = 2 };

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
} span;

/* Python's lamina.tar.format._num for the strict subset: optional spaces, octal digits, then NUL/spaces. */
static int octal(const unsigned char *f, int len, long long *out) {
    int end = 0;
    while (end < len && f[end] != 0) end++;
    int i = 0, j = end;
    if (len > 0 && (f[0] == 0x80 || f[0] == 0xff)) return -1; /* base-256: Python decides */
    while (i < j && (f[i] == ' ')) i++;
    while (j > i && (f[j - 1] == ' ')) j--;
    long long v = 0;
    if (j - i > 21) return -1;
    for (int k = i; k < j; k++) {
        if (f[k] < '0' || f[k] > '7') return -1;
        v = v * 8 + (f[k] - '0');
    }
    *out = v;
    return 0;
}

/* Decimal for PAX size/uid/gid (Python: int(value.split(b".")[0]), non-negative). */
static int pax_int(span v, long long *out) {
    Py_ssize_t i = 0;
    long long x = 0;
    while (i < v.n && v.p[i] != '.') {
        if (v.p[i] < '0' || v.p[i] > '9' || i >= 18) return -1;
        x = x * 10 + (v.p[i] - '0');
        i++;
    }
    if (i == 0) return -1;
    *out = x;
    return 0;
}

/* PAX mtime as nanoseconds, non-negative "sec[.frac]" only. */
static int pax_mtime(span v, long long *out) {
    Py_ssize_t i = 0;
    long long sec = 0, frac = 0;
    while (i < v.n && v.p[i] != '.') {
        if (v.p[i] < '0' || v.p[i] > '9' || i >= 12) return -1;
        sec = sec * 10 + (v.p[i] - '0');
        i++;
    }
    if (sec > MAX_SECONDS) return -1;
    if (i < v.n) { /* '.' */
        Py_ssize_t k = 0;
        i++;
        for (; k < 9; k++) {
            int d = 0;
            if (i + k < v.n) {
                if (v.p[i + k] < '0' || v.p[i + k] > '9') return -1;
                d = v.p[i + k] - '0';
            }
            frac = frac * 10 + d;
        }
    }
    *out = sec * 1000000000LL + frac;
    return 0;
}

static int starts(span s, const char *lit) {
    size_t n = strlen(lit);
    return (size_t)s.n >= n && memcmp(s.p, lit, n) == 0;
}

static int equals(span s, const char *lit) {
    size_t n = strlen(lit);
    return (size_t)s.n == n && memcmp(s.p, lit, n) == 0;
}

static span cstr(const unsigned char *f, int len) {
    span s = {f, 0};
    while (s.n < len && f[s.n]) s.n++;
    return s;
}

typedef struct {
    long long mode, uid, gid, size, mtime_ns;
    char type; /* 'R' regular, 'S' symlink */
    span name, prefix, link;
    int has_prefix;
} entry;

/* One header block: checksum and numbers; -1 = not for the fast path. */
static int header(const unsigned char *b, entry *e, char *typ) {
    long long stored, v;
    unsigned long sum = 0;
    if (octal(b + 148, 8, &stored) < 0) return -1;
    for (int i = 0; i < BLOCK; i++) sum += b[i];
    for (int i = 148; i < 156; i++) sum -= b[i];
    sum += 256;
    if ((long long)sum != stored) return -1;
    if (octal(b + 100, 8, &v) < 0) return -1;
    e->mode = v & 07777;
    if (octal(b + 108, 8, &e->uid) < 0 || octal(b + 116, 8, &e->gid) < 0) return -1;
    if (octal(b + 124, 12, &e->size) < 0 || octal(b + 136, 12, &v) < 0) return -1;
    if (v > MAX_SECONDS) return -1;
    e->mtime_ns = v * 1000000000LL;
    *typ = (char)b[156];
    e->name = cstr(b, 100);
    e->link = cstr(b + 157, 100);
    e->has_prefix = memcmp(b + 257, "ustar\0", 6) == 0 && b[345] != 0;
    e->prefix = cstr(b + 345, 155);
    return 0;
}

/* PAX records, as lamina.tar.format.parse_pax; overrides into e. -1 = malformed or not applicable here. */
static int pax(span d, entry *e, int *has_path, int *has_link) {
    Py_ssize_t pos = 0;
    while (pos < d.n) {
        if (d.p[pos] == 0) break;
        Py_ssize_t sp = pos;
        long long length = 0;
        while (sp < d.n && d.p[sp] != ' ') {
            if (d.p[sp] < '0' || d.p[sp] > '9' || sp - pos > 9) return -1;
            length = length * 10 + (d.p[sp] - '0');
            sp++;
        }
        if (sp >= d.n || sp == pos) return -1;
        Py_ssize_t end = pos + length;
        if (length <= sp - pos + 1 || end > d.n || d.p[end - 1] != '\n') return -1;
        span kv = {d.p + sp + 1, end - 1 - (sp + 1)};
        Py_ssize_t eq = 0;
        while (eq < kv.n && kv.p[eq] != '=') eq++;
        if (eq == 0 || eq >= kv.n) return -1;
        span key = {kv.p, eq}, val = {kv.p + eq + 1, kv.n - eq - 1};
        if (equals(key, "path")) {
            if (memchr(val.p, 0, val.n)) return -1;
            e->name = val;
            *has_path = 1;
        } else if (equals(key, "linkpath")) {
            if (memchr(val.p, 0, val.n)) return -1;
            e->link = val;
            *has_link = 1;
        } else if (equals(key, "size")) {
            if (pax_int(val, &e->size) < 0) return -1;
        } else if (equals(key, "uid")) {
            if (pax_int(val, &e->uid) < 0) return -1;
        } else if (equals(key, "gid")) {
            if (pax_int(val, &e->gid) < 0) return -1;
        } else if (equals(key, "mtime")) {
            if (pax_mtime(val, &e->mtime_ns) < 0) return -1;
        } else if (starts(key, "SCHILY.xattr.") || starts(key, "LIBARCHIVE.xattr.") || starts(key, "GNU.sparse")) {
            return -1;
        }
        pos = end;
    }
    return 0;
}

static Py_ssize_t pad(long long n) { return (BLOCK - n % BLOCK) % BLOCK; }

static int append(PyObject *ba, const void *p, Py_ssize_t n) {
    Py_ssize_t old = PyByteArray_GET_SIZE(ba);
    if (n == 0) return 0;
    if (PyByteArray_Resize(ba, old + n) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(ba) + old, p, n);
    return 0;
}

static void be32(unsigned char *o, uint32_t v) {
    o[0] = v >> 24; o[1] = v >> 16; o[2] = v >> 8; o[3] = v;
}

static void le32(unsigned char *o, uint32_t v) {
    o[0] = v; o[1] = v >> 8; o[2] = v >> 16; o[3] = v >> 24;
}

static void be64(unsigned char *o, uint64_t v) {
    for (int i = 7; i >= 0; i--) { o[i] = v & 0xff; v >>= 8; }
}

/* Frame the raw bytes pending before a payload as one R operation (lamina.tar.split.RecordWriter._frame_raw):
   what the recorder already held, then buf[from:to] (the headers and padding read since). */
static int frame_raw(PyObject *raw, PyObject *out, const unsigned char *from, Py_ssize_t n) {
    Py_ssize_t held = PyByteArray_GET_SIZE(raw);
    unsigned char h[5];
    if (held + n == 0) return 0;
    h[0] = 'R';
    be32(h + 1, (uint32_t)(held + n));
    if (append(out, h, 5) < 0) return -1;
    if (held && (append(out, PyByteArray_AS_STRING(raw), held) < 0 || PyByteArray_Resize(raw, 0) < 0)) return -1;
    return append(out, from, n);
}

/* One applied entry for lamina.fs.apply._Applier.sync_native: kind, F-operation index, path length, path. */
static int note(PyObject *log, char kind, Py_ssize_t index, const char *real, Py_ssize_t rn) {
    unsigned char h[9];
    h[0] = (unsigned char)kind;
    le32(h + 1, (uint32_t)index);
    le32(h + 5, (uint32_t)rn);
    return append(log, h, 9) < 0 ? -1 : append(log, real, rn);
}

static int write_all(int fd, const unsigned char *p, long long n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n > (1 << 30) ? (1 << 30) : (size_t)n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) {
            errno = ENOSPC;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

/* OSError naming the file as Python's os call would (none for calls on an fd). */
static PyObject *oserror(int err, const char *name) {
    errno = err;
    if (name == NULL) return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *n = PyUnicode_DecodeFSDefault(name);
    errno = err;
    if (n == NULL) return NULL;
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, n);
    Py_DECREF(n);
    return NULL;
}

/* Retry a system call interrupted by a signal, as Python's os functions do. */
#define RETRY(call) ({ long r_; do { r_ = (long)(call); } while (r_ < 0 && errno == EINTR); r_; })

static PyObject *run(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buf", "pos", "head", "pfd", "preal", "is_root", "euid", "egid", "sgid",
                             "umask", "max_entries", "raw", "out", "rec_index", "log", NULL};
    Py_buffer buf;
    Py_ssize_t pos, max_entries, rec_index;
    PyObject *head, *preal, *raw, *out, *log;
    int pfd, is_root, sgid, umask_;
    long long euid, egid;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*nOiOpLLpinOOnY", kwlist, &buf, &pos, &head, &pfd, &preal,
                                     &is_root, &euid, &egid, &sgid, &umask_, &max_entries, &raw, &out,
                                     &rec_index, &log))
        return NULL;
    const unsigned char *b = buf.buf;
    Py_ssize_t len = buf.len;
    if (pos < 0 || pos > len) {
        PyErr_SetString(PyExc_ValueError, "pos outside the buffer");
        PyBuffer_Release(&buf);
        return NULL;
    }
    int recording = raw != Py_None;
    Py_ssize_t unframed = pos; /* buf[unframed:pos] was read but not yet framed into the record */
    if (recording && (!PyByteArray_Check(raw) || !PyByteArray_Check(out))) {
        PyErr_SetString(PyExc_TypeError, "raw and out must be bytearrays");
        PyBuffer_Release(&buf);
        return NULL;
    }
    const char *hd = NULL, *pr = NULL;
    Py_ssize_t hlen = 0, plen = 0;
    long long count = 0, total = 0;
    int status = ST_SLOW;
    PyObject *extra = Py_None;
    Py_INCREF(extra);
    char path[MAX_NAME + 2], base[MAX_NAME + 1], link[MAX_NAME + 1], real[2 * MAX_NAME + 2];

    if (head != Py_None) {
        if (!PyBytes_Check(head) || !PyBytes_Check(preal)) {
            PyErr_SetString(PyExc_TypeError, "head and preal must be bytes");
            goto fail;
        }
        hd = PyBytes_AS_STRING(head);
        hlen = PyBytes_GET_SIZE(head);
        pr = PyBytes_AS_STRING(preal);
        plen = PyBytes_GET_SIZE(preal);
        if (plen > MAX_NAME) goto done;
    }
    int pdepth = 0;
    if (pr != NULL && plen > 0) {
        pdepth = 1;
        for (Py_ssize_t i = 0; i < plen; i++) pdepth += pr[i] == '/';
    }

    while (max_entries < 0 || count < max_entries) {
        Py_ssize_t start = pos, at = pos;
        entry e;
        char typ;
        int has_path = 0, has_link = 0;
        if (at + BLOCK > len) break;
        if (header(b + at, &e, &typ) < 0) break;
        if (typ == 'x') {
            span d = {b + at + BLOCK, (Py_ssize_t)e.size};
            if (e.size > (1 << 20) || at + BLOCK + e.size + pad(e.size) + BLOCK > len) break;
            at += BLOCK + e.size + pad(e.size);
            entry h;
            char t2;
            if (header(b + at, &h, &t2) < 0) break;
            if (pax(d, &h, &has_path, &has_link) < 0) break;
            e = h;
            typ = t2;
        }
        at += BLOCK;
        if (e.uid > MAX_ID || e.gid > MAX_ID) break; /* Python reports what chown makes of these */
        if (typ == '0' || typ == 0 || typ == '7') {
            e.type = 'R';
        } else if (typ == '2') {
            e.type = 'S';
        } else {
            break;
        }
        /* The name: PAX path, else ustar prefix + name. Normalised like lamina.fs.ops.normalize. */
        char joined[MAX_NAME + 1];
        Py_ssize_t jn = 0;
        if (!has_path && e.has_prefix) {
            if (e.prefix.n + 1 + e.name.n > MAX_NAME) break;
            memcpy(joined, e.prefix.p, e.prefix.n);
            joined[e.prefix.n] = '/';
            memcpy(joined + e.prefix.n + 1, e.name.p, e.name.n);
            jn = e.prefix.n + 1 + e.name.n;
        } else {
            if (e.name.n > MAX_NAME) break;
            memcpy(joined, e.name.p, e.name.n);
            jn = e.name.n;
        }
        if (jn == 0 || joined[jn - 1] == '/') break;
        Py_ssize_t pn = 0, last = 0, i = 0;
        int bad = 0;
        while (i < jn) {
            Py_ssize_t j = i;
            while (j < jn && joined[j] != '/') j++;
            Py_ssize_t cl = j - i;
            if (cl == 0 || (cl == 1 && joined[i] == '.')) {
            } else if ((cl == 2 && joined[i] == '.' && joined[i + 1] == '.') || cl > NAME_MAX_BYTES) {
                bad = 1; /* ".." or a component no filesystem holds: Python refuses it with its own words */
                break;
            } else {
                if (pn) path[pn++] = '/';
                last = pn;
                memcpy(path + pn, joined + i, cl);
                pn += cl;
            }
            i = j + 1;
        }
        if (bad || pn == 0) break;
        Py_ssize_t bn = pn - last;
        memcpy(base, path + last, bn);
        base[bn] = 0;
        if (bn >= 4 && memcmp(base, ".wh.", 4) == 0) break;
        Py_ssize_t headlen = last ? last - 1 : 0;
        if (hd == NULL || headlen != hlen || memcmp(path, hd, hlen) != 0) {
            Py_DECREF(extra);
            extra = PyBytes_FromStringAndSize(path, headlen);
            if (extra == NULL) goto fail;
            status = ST_PARENT;
            break;
        }
        /* the layer-relative real path, as Python builds it: preal/base */
        Py_ssize_t rn = 0;
        if (plen) {
            memcpy(real, pr, plen);
            real[plen] = '/';
            rn = plen + 1;
        }
        memcpy(real + rn, base, bn);
        rn += bn;
        real[rn] = 0;
        struct timespec ts[2];
        ts[0].tv_sec = ts[1].tv_sec = e.mtime_ns / 1000000000LL;
        ts[0].tv_nsec = ts[1].tv_nsec = e.mtime_ns % 1000000000LL;
        int err = 0, owner_failed = 0;
        const char *culprit = NULL; /* the name Python's failing call would report */
        if (e.type == 'R') {
            Py_ssize_t payload = at;
            if (e.size < 0 || payload + e.size + pad(e.size) > len) break;
            long long mode = e.mode;
            int direct = (mode & 07000) == 0 && (mode & umask_) == 0;
            int fd;
            Py_BEGIN_ALLOW_THREADS
            fd = (int)RETRY(openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                                   direct ? (mode_t)mode : 0600));
            if (fd < 0) {
                err = errno;
                culprit = base;
            } else {
                if (write_all(fd, b + payload, e.size) < 0) {
                    err = errno;
                } else if (is_root && (e.uid != euid || e.gid != egid || sgid) &&
                           RETRY(fchown(fd, (uid_t)e.uid, (gid_t)e.gid)) < 0) {
                    err = errno;
                    owner_failed = err == EINVAL;
                } else if (!direct && RETRY(fchmod(fd, (mode_t)mode)) < 0) {
                    err = errno;
                } else if (RETRY(futimens(fd, ts)) < 0) {
                    err = errno;
                }
                if (close(fd) < 0 && !err) err = errno;
            }
            Py_END_ALLOW_THREADS
            if (fd < 0 && err == EEXIST) break;
            if (owner_failed) goto owner;
            if (err) {
                oserror(err, culprit);
                goto fail;
            }
            if (note(log, 'F', recording ? rec_index : 0, real, rn) < 0) goto fail;
            if (recording) {
                unsigned char h[13];
                h[0] = 'F';
                be32(h + 1, (uint32_t)rn);
                if (frame_raw(raw, out, b + unframed, payload - unframed) < 0 || append(out, h, 5) < 0 ||
                    append(out, real, rn) < 0)
                    goto fail;
                be64(h, (uint64_t)e.size);
                if (append(out, h, 8) < 0) goto fail;
                unframed = payload + e.size; /* the padding is raw */
                rec_index++;
            }
            total += e.size;
            pos = payload + e.size + pad(e.size);
        } else {
            /* symlink: a relative target may not climb above the root (lamina.fs.apply.check_symlink) */
            if (e.link.n == 0 || e.link.n >= MAX_NAME) break; /* symlink targets: 1 to 4095 bytes */
            memcpy(link, e.link.p, e.link.n);
            link[e.link.n] = 0;
            if (memchr(link, 0, e.link.n)) break;
            if (link[0] != '/') {
                int depth = pdepth, out_of_root = 0;
                Py_ssize_t k = 0;
                while (k < e.link.n) {
                    Py_ssize_t m = k;
                    while (m < e.link.n && link[m] != '/') m++;
                    Py_ssize_t cl = m - k;
                    if (cl == 2 && link[k] == '.' && link[k + 1] == '.') {
                        if (--depth < 0) { out_of_root = 1; break; }
                    } else if (cl > 0 && !(cl == 1 && link[k] == '.')) {
                        depth++;
                    }
                    k = m + 1;
                }
                if (out_of_root) break;
            }
            int made = 0;
            Py_BEGIN_ALLOW_THREADS
            if (RETRY(symlinkat(link, pfd, base)) < 0) {
                err = errno;
                culprit = link; /* os.symlink names its target first */
            } else {
                made = 1;
                culprit = base;
                if (is_root && RETRY(fchownat(pfd, base, (uid_t)e.uid, (gid_t)e.gid, AT_SYMLINK_NOFOLLOW)) < 0) {
                    err = errno;
                    owner_failed = err == EINVAL;
                } else if (RETRY(utimensat(pfd, base, ts, AT_SYMLINK_NOFOLLOW)) < 0) {
                    err = errno;
                }
            }
            Py_END_ALLOW_THREADS
            if (!made && err == EEXIST) break;
            if (owner_failed) goto owner;
            if (err) {
                oserror(err, culprit);
                goto fail;
            }
            if (note(log, 'S', 0, real, rn) < 0) goto fail;
            pos = at;
        }
        count++;
        continue;
    owner:
        Py_DECREF(extra);
        extra = NULL;
        {
            PyObject *n = PyUnicode_DecodeUTF8(joined, jn, "surrogateescape");
            if (n == NULL) goto fail;
            extra = Py_BuildValue("(NLL)", n, e.uid, e.gid);
        }
        if (extra == NULL) goto fail;
        status = ST_OWNER;
        pos = start;
        break;
    }
done:
    if (recording && pos > unframed && append(raw, b + unframed, pos - unframed) < 0) goto fail;
    PyBuffer_Release(&buf);
    return Py_BuildValue("(inLLnN)", status, pos, count, total, rec_index, extra);
fail:
    Py_XDECREF(extra);
    PyBuffer_Release(&buf);
    return NULL;
}

static PyObject *tune_malloc(PyObject *self, PyObject *unused) {
    /* Large stream buffers (1 MiB) come and go for every chunk of a layer: keep them in the heap instead
       of mapping and unmapping (and page-faulting) each one. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))run, METH_VARARGS | METH_KEYWORDS,
     "Apply the plain entries at the start of buf[pos:] (see lamina.fs.apply)."},
    {"tune_malloc", tune_malloc, METH_NOARGS, "Keep large buffers in the heap between chunks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lamina.fs._native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "SLOW", ST_SLOW) < 0 || PyModule_AddIntConstant(m, "PARENT", ST_PARENT) < 0 ||
        PyModule_AddIntConstant(m, "OWNER", ST_OWNER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
