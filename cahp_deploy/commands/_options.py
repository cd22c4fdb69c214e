"""Options shared by several commands, declared once so their names and help never drift."""

from __future__ import annotations

import click

from cahp_deploy.config import ColumnsConfig

force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")


def data_options(default_split: str = "train", required: bool = True):
    """--data, --split, then the columns (:class:`cahp_deploy.config.ColumnsConfig`)."""

    def decorate(f):
        f = ColumnsConfig.cli()(f)
        f = click.option("--split", default=default_split, show_default=True, help="Split to use (file stem).")(f)
        return click.option("--data", required=required, help="Labelled data: a dir of <split>.jsonl/.csv/.parquet "
                            "files, a save_to_disk dir, one file, or a hub id.")(f)

    return decorate
