"""``lamina events``: what every process does to the store's images, containers and layers, as it happens."""

from __future__ import annotations

import click

from lamina.cli.app import Globals, cli, format_option


@cli.command()
@click.option("--since", metavar="TIME", help="Show the events from TIME on (RFC 3339, Unix seconds, or a "
              "duration before now such as 10m); without it (nor --until) only new events.")
@click.option("--until", metavar="TIME", help="Stop at TIME (same forms as --since) instead of following forever.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="type=image|container|layer, event=ACTION, image=NAME|ID, container=NAME|ID, layer=ID "
              "(repeat a key for either value; different keys must all match).")
@format_option
@click.pass_obj
def events(g: Globals, since: str | None, until: str | None, filters: tuple[str, ...]) -> None:
    """Show the events of image, container and layer actions of every process using the store: pull, push,
    load, save, import, tag, untag, delete, commit, squash, prune, create, mount, unmount, remove, start,
    exit. Follows new events until interrupted (Ctrl-C, status 0), or until --until has passed.

    One line per event: TIME TYPE ACTION ID NAME (ATTRIBUTES); with --format json one JSON object per line
    (docker's shape: Type, Action, Actor.ID, Actor.Attributes, time, timeNano)."""
    import json

    from lamina.cli.app import Interrupted

    with g.open() as svc:
        stream = svc.events(since=since, until=until, filters=list(filters), follow=True)
        try:
            for ev in stream:
                click.echo(json.dumps(ev.as_docker(), sort_keys=True) if g.format == "json" else ev.line())
        except Interrupted:
            pass  # following ends here; the store closes as after any command
