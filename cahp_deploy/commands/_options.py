"""Options shared by several commands, declared once so their names and help never drift."""

from __future__ import annotations

import click

force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")


def data_options(default_split: str = "train", required: bool = True):
    """--data, --split, --text-column, --text-pair-column, --label-column."""

    def decorate(f):
        for opt in reversed(
            [
                click.option("--data", required=required, help="Labelled data: a dir of <split>.jsonl/.csv/.parquet files, a save_to_disk dir, one file, or a hub id."),
                click.option("--split", default=default_split, show_default=True, help="Split to use (file stem)."),
                click.option("--text-column", default=None, help="Text column [default: text, or premise/hypothesis when present]."),
                click.option("--text-pair-column", default=None, help="Second text column for pair tasks."),
                click.option("--label-column", default="label", show_default=True, help="Integer label column."),
            ]
        ):
            f = opt(f)
        return f

    return decorate
