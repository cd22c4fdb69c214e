"""The ``cahp-deploy`` command line.

Each command lives in ``cahp_deploy/commands/<name>.py`` as a click command named ``command`` that
maps its options onto one public function. Commands are imported lazily so ``--help`` is instant and
one stage's heavy imports do not slow another's.

User errors (:class:`CahpError`) become one line on stderr and exit code 2; Ctrl-C exits 130 and
leaves no half-written output (stages write atomically).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

import click

from cahp_deploy import __version__
from cahp_deploy.errors import CahpError

#: command name -> module under cahp_deploy.commands, in the order the help lists them
COMMANDS: dict[str, str] = {
    "run": "run",
    "demo": "demo",
    "select": "select",
    "prune": "prune",
    "recover": "recover",
    "export": "export",
    "verify": "verify",
    "handoff": "handoff",
    "serve": "serve",
    "bench": "bench",
    "predict": "predict",
    "study": "study",
}


class LazyGroup(click.Group):
    def _available(self) -> dict[str, str]:
        return {
            name: mod
            for name, mod in COMMANDS.items()
            if importlib.util.find_spec(f"cahp_deploy.commands.{mod}") is not None
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._available())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod = self._available().get(name)
        if mod is None:
            return None
        return importlib.import_module(f"cahp_deploy.commands.{mod}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cahp-deploy")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def cli(verbose: bool) -> None:
    """Prune attention heads with CAHP and ship the model as a verified, benchmarked ONNX artifact.

    \b
    select -> prune -> [recover] -> export -> bench, or all of them with `run`.
    Try `cahp-deploy demo --out demo-out` first: it runs offline on the packaged MiniLM.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # transformers 5.x draws a "Loading weights" bar on stderr for every model load; its bars follow
    # huggingface_hub's switch, read at import, so in-process callers that imported it already are
    # switched off directly (stderr carries only `error: ...` lines and warnings)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    try:
        cli.main(args=argv, prog_name="cahp-deploy", standalone_mode=False)
    except CahpError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: interrupted; no partial output was kept", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted; no partial output was kept", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
