"""``cahp-deploy serve``: a real Triton Inference Server on a ``--target triton-text`` handoff dir."""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("handoff_dir", type=click.Path())
@click.option("--http-port", type=int, default=8000, show_default=True, help="HTTP/REST port (KServe v2 protocol).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics port.")
@click.option("--python-env", type=click.Path(file_okay=False), default=None,
              help="Virtualenv (same Python version) Triton's Python stub runs in: numpy<2, onnxruntime, tokenizers "
                   "[default: this one if its numpy is < 2, else a cached overlay of it with numpy<2].")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Write the server's log here [default: a file in the temp dir, named on start].")
@click.option("--ready-timeout", type=float, default=180, show_default=True,
              help="Seconds to wait for the model to load before giving up.")
def command(handoff_dir, http_port, grpc_port, metrics_port, python_env, log_file, ready_timeout) -> None:
    """Serve HANDOFF_DIR (from `cahp-deploy handoff --target triton-text`) with Triton until Ctrl-C.

    \b
    The server is the tritonserver binary of the `serve` extra (nvidia-pytriton) on CPU.
    Send text, get labels and probabilities:
      curl -s localhost:8000/v2/models/NAME/infer -d \\
        '{"inputs":[{"name":"TEXT","shape":[1,1],"datatype":"BYTES","data":["a fine film"]}]}'
    Ctrl-C (or SIGTERM) lets in-flight requests finish, stops the server and exits 0.
    """
    from cahp_deploy.handoff.serve import serve

    def ready(server) -> None:
        click.echo(f"serving {server.name} at {server.url}/v2/models/{server.name}/infer "
                   f"(gRPC :{server.ports['--grpc-port']}, metrics :{server.ports['--metrics-port']}); "
                   f"log: {server.log_path}; Ctrl-C stops", err=True)

    serve(handoff_dir, http_port, grpc_port, metrics_port, python_env_dir=python_env, log_path=log_file,
          ready_timeout_s=ready_timeout, on_ready=ready)
    click.echo("stopped", err=True)
