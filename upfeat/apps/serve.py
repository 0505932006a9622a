"""``upfeat serve``: the web demo, a Gradio app (optional extra: ``pip install -e ".[demo]"``).

Upload an image (or pick an example), choose a backbone and an upsampler, and see image | low-res
features | upsampled features side by side in PCA colours, with the time taken; the work is done
by :class:`upfeat.apps.web_demo.Demo`. Nothing leaves the machine: it listens on 127.0.0.1 unless told
otherwise, Gradio's analytics are off, there is no share link unless ``share=True``, and uploads
are removed from Gradio's cache after a few minutes and at exit.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .web_demo import Demo, DemoError, DemoSettings, upsampler_choices

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["build_app", "launch", "serve"]

MB = 1_000_000
INSTALL = 'the web demo needs Gradio: pip install -e ".[demo]"'
_CLEANUP = (300, 300)  # every 5 min, delete this app's cached uploads/outputs older than 5 min


def _gradio():
    """Gradio, imported with its analytics and Hugging Face telemetry off."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise ImportError(INSTALL) from None
    return gradio


def build_app(demo: Demo, examples: Sequence[str | os.PathLike[str]] = (),
              max_upload_mb: float = 20.0) -> gr.Blocks:
    """The demo page as a :class:`gradio.Blocks` (not launched).

    Element ids (for tests): ``upload``, ``backbone``, ``upsampler``, ``run``, ``status``,
    ``out-image``, ``out-lowres``, ``out-upsampled``.
    """
    gr = _gradio()
    first = demo.backbones[0]

    def on_backbone(backbone: str):
        names = upsampler_choices(backbone)
        return gr.Dropdown(choices=names, value=_preferred(names))

    def on_run(path: str | None, backbone: str, upsampler: str):
        try:
            r = demo.run(path, backbone, upsampler)
        except DemoError as e:
            raise gr.Error(str(e), print_exception=False) from None
        (w, h), (gh, gw) = r.size, r.grid
        return (gr.Image(r.image, label=f"image {w} x {h}"),
                gr.Image(r.lowres, label=f"low-res {r.backbone} features, {gw} x {gh} x {r.dim}"),
                gr.Image(r.upsampled, label=f"{r.upsampler} upsampled, {w} x {h} x {r.dim}"),
                r.summary())

    note = (f"Images are downscaled so that their longer side is at most {demo.settings.max_side} "
            f"px before inference; uploads up to {max_upload_mb:g} MB. Colours: the first three "
            f"PCA components of the low-res features, the same for both maps.")
    with gr.Blocks(title="upfeat demo", analytics_enabled=False, delete_cache=_CLEANUP) as app:
        gr.Markdown("# upfeat: sharp features, live")
        gr.Markdown(note, elem_id="note")
        with gr.Row():
            upload = _path_unread(gr.Image(type="filepath", label="image", elem_id="upload",
                                           sources=["upload", "clipboard"], height=320))
            with gr.Column():
                backbone = gr.Dropdown(demo.backbones, value=first, label="backbone",
                                       elem_id="backbone")
                names = upsampler_choices(first)
                upsampler = gr.Dropdown(names, value=_preferred(names), label="upsampler",
                                        elem_id="upsampler")
                run = gr.Button("Upsample features", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            outs = [gr.Image(label=label, elem_id=f"out-{key}", interactive=False, format="png")
                    for key, label in (("image", "image"), ("lowres", "low-res features"),
                                       ("upsampled", "upsampled features"))]
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[upload], label="examples")
        backbone.change(on_backbone, backbone, upsampler)
        # clear the last result first: a failed run never leaves a stale picture on the page
        run.click(lambda: (None, None, None, ""), None, [*outs, status], queue=False).then(
            on_run, [upload, backbone, upsampler], [*outs, status])
    return app


def _path_unread(image: gr.Image) -> gr.Image:
    """``image`` passing an upload to the app as the file's path, unread (Gradio would open it
    with PIL first): upfeat decodes it (pixel cap, any mode) and names what is wrong with a bad
    file in one line. Set on the instance: a subclass would make Gradio write a ``.pyi`` stub
    beside this module."""
    default = image.preprocess
    image.preprocess = lambda payload: (payload.path if payload is not None and payload.path
                                        else default(payload))
    return image


def _preferred(names: list[str]) -> str:
    return "jbu" if "jbu" in names else "bilinear"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 20.0,
           max_side: int = 640, examples: Sequence[str | os.PathLike[str]] = (),
           share: bool = False, open_browser: bool = False, block: bool = True,
           quiet: bool = False, demo: Demo | None = None) -> tuple[gr.Blocks, str]:
    """Start the demo; returns the app and its local URL (with ``block=False``, at once).

    ``port=0`` picks a free port. Raises ``ValueError`` for bad limits, ``OSError`` when the
    address cannot be listened on, ``ImportError`` (one line) without Gradio.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    if not max_upload_mb > 0:
        raise ValueError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    demo = demo or Demo(DemoSettings(max_side=max_side))
    app = build_app(demo, examples, max_upload_mb)
    if port == 0:
        port = _free_port(host)
    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=share, inbrowser=open_browser,
            prevent_thread_lock=not block, quiet=quiet, max_file_size=int(max_upload_mb * MB),
            allowed_paths=sorted({str(Path(p).resolve()) for p in examples}),  # the files, not their folders
            ssr_mode=False, mcp_server=False, footer_links=[], show_error=True)
    except OSError as e:  # port taken, address not on this machine, no permission
        raise OSError(f"cannot listen on {host}:{port}: {' '.join(str(e).split())}") from None
    return app, app.local_url


def serve(host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 20.0,
          max_side: int = 640, examples: Sequence[str | os.PathLike[str]] = (),
          share: bool = False, open_browser: bool = False,
          echo: Callable[[str], object] = print) -> None:
    """Run the demo until Ctrl-C (what ``upfeat serve`` does), with a warning off loopback."""
    if not _is_loopback(host) or share:
        echo(f"warning: {'a public share link' if share else f'listening on {host}'} makes the "
             f"demo reachable from other machines, without authentication")
    launch(host, port, max_upload_mb, max_side, examples, share, open_browser, block=True)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
