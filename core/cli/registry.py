"""Registry commands: ``pull``, ``push``, ``login`` and ``logout``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from lamina.cli.app import Globals, Progress, cli, emit, format_option, to_platform


def _creds(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    from lamina.errors import LaminaError

    user, sep, password = value.partition(":")
    if not sep or not user:
        raise LaminaError("--creds must be USER:PASSWORD")
    return user, password


class _TlsVerify(click.ParamType):  # type: ignore[type-arg]
    name = "bool"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        self.fail(f"{value!r} is not true or false", param, ctx)


_TLS = _TlsVerify()


def _registry_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--creds", metavar="USER:PASSWORD", help="Credentials for the registry.")(f)
    return _tls_option(
        "Require HTTPS with a valid certificate (default: yes, except loopback and [images] "
        "insecure_registries); --tls-verify=false allows plain HTTP."
    )(f)


def _tls_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--tls-verify``, ``--tls-verify=true`` or ``--tls-verify=false`` (podman's spelling); a bare
    ``--tls-verify`` is rewritten to ``--tls-verify=true`` by ``lamina.cli.entry._bare_tls_verify``."""
    return click.option("--tls-verify", "tls_verify", type=_TLS, default=None, metavar="[=true|false]", help=help)


class _TransferProgress(Progress):
    def __call__(self, ev: dict[str, Any]) -> None:
        if ev.get("event") == "blob" and self.tty:
            from lamina.digest import short

            sys.stderr.write(f"blob {short(ev['digest'])}: {ev['status']}\n")
            return
        super().__call__(ev)


@cli.command()
@click.argument("name", metavar="IMAGE")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pull from an index (default: host).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Debug logging, e.g. which registry or mirror served each blob.")
@_registry_options
@format_option
@click.pass_obj
def pull(g: Globals, name: str, platform: str | None, quiet: bool, debug: bool, tls_verify: bool | None,
         creds: str | None) -> None:
    """Pull an image from a registry (unqualified names try [images] registries in order, [[registry]] mirrors
    come before their registry); prints its ID."""
    if debug:
        import logging

        logging.getLogger().setLevel(logging.DEBUG)
    with g.open() as svc:
        img = svc.pull_image(
            name,
            platform=to_platform(platform),
            tls_verify=tls_verify,
            creds=_creds(creds),
            progress=None if quiet else _TransferProgress(),
        )
    emit(g, {"Id": img.id, "RepoTags": img.repo_tags, "RepoDigests": img.repo_digests}, lambda: click.echo(img.id))


@cli.command()
@click.argument("ref", metavar="IMAGE")
@click.argument("dest", required=False, metavar="[DESTINATION]")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_registry_options
@format_option
@click.pass_obj
def push(g: Globals, ref: str, dest: str | None, quiet: bool, tls_verify: bool | None, creds: str | None) -> None:
    """Push an image to a registry (to DESTINATION, default its name); prints the manifest digest."""
    with g.open() as svc:
        digest = svc.push_image(
            ref, dest, tls_verify=tls_verify, creds=_creds(creds), progress=None if quiet else _TransferProgress()
        )
    emit(g, {"digest": digest}, lambda: click.echo(digest))


@cli.command()
@click.argument("host", metavar="REGISTRY")
@click.option("-u", "--username", required=True, help="User name.")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_tls_option("See `lamina pull --help`.")
@click.pass_obj
def login(g: Globals, host: str, username: str, password: str | None, password_stdin: bool,
          tls_verify: bool | None) -> None:
    """Check credentials against a registry and store them for later pulls and pushes.

    They go to the credential helper docker's config (or another auth file) names for the registry, else to
    lamina's auth file.
    """
    from lamina.errors import LaminaError

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if password is None:
        if not sys.stdin.isatty():
            raise LaminaError("no password: use --password-stdin or --password")
        password = click.prompt("Password", hide_input=True)
    with g.open() as svc:
        svc.login(host, username, password, tls_verify=tls_verify)
    click.echo("Login Succeeded!")


@cli.command()
@click.argument("host", metavar="REGISTRY")
def logout(host: str) -> None:
    """Forget the credentials stored for a registry (in lamina's auth file and the credential helper)."""
    from lamina.service import ImageService

    ImageService.logout(host)
    click.echo(f"Removed login credentials for {host}")
