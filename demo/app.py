"""The Gradio page: a thin shell over ``ascl.demo.search`` and a ``GalleryService`` (``ascl.serving.online.gallery``).

Gradio is imported inside the functions (``ascl --help`` must not pay for it), and telemetry,
version checks and server-side rendering are switched off before the first import: the demo
runs offline and never phones home.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ascl.demo import search as actions
from ascl.images import MAX_IMAGE_BYTES
from ascl.serving.online.gallery import GalleryService

QUIET_GRADIO_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # no usage pings, no PyPI version check
    "GRADIO_SSR_MODE": "False",  # no Node server
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
DEFAULT_K = 10


def quiet_gradio() -> None:
    """Set the environment that keeps Gradio offline; call before importing gradio."""
    for key, value in QUIET_GRADIO_ENV.items():
        os.environ[key] = value


def _results_view(outcome: actions.SearchOutcome, backend: GalleryService) -> tuple[list[Any], str, list[dict[str, Any]]]:
    gallery = [(actions.thumbnail(r), actions.caption(r)) for r in outcome.results]
    status = (f"**{len(outcome.results)} results in {outcome.seconds * 1000:.1f} ms** "
              f"({backend.description})")
    raw = [{"id": r.id, "score": round(r.score, 6), "label": r.label, "name": r.name} for r in outcome.results]
    return gallery, status, raw


def build_app(backend: GalleryService, examples: Sequence[Path] = (), *, title: str = "ascl image search",
              subtitle: str = "") -> Any:
    """The Blocks app. Its API endpoints ``/search`` (image, k, label filter: "any" by default)
    and ``/add`` (image, label) are what ``gradio_client`` calls; the page wires the same handlers
    to upload, webcam, clipboard, example clicks, the k slider and the label filter (a dropdown of
    the gallery's labels: the search then passes ``where={"label": ...}``)."""
    quiet_gradio()
    import gradio as gr

    def label_choices() -> list[str]:
        """"any", then the gallery's labels (read again after an add, which may bring a new one)."""
        try:
            labels = backend.labels()
        except Exception:  # the label list is a convenience: searching still works without it
            labels = []
        return [actions.ANY_LABEL, *[lab for lab in labels if lab != actions.ANY_LABEL]]

    def on_search(image: Any, k: Any, only: Any = actions.ANY_LABEL) -> tuple[Any, str, Any]:
        if image is None:  # the image was cleared: leave results and messages as they are
            return gr.skip(), gr.skip(), gr.skip()
        try:
            data, name = actions.upload_bytes(image)
            outcome = actions.search(backend, data, k, name, label=only)
        except actions.UserError as exc:
            gr.Warning(str(exc))
            return [], f"**Error:** {exc}", []
        return _results_view(outcome, backend)

    def on_add(image: Any, label: str) -> tuple[str, Any]:
        try:
            data, name = actions.upload_bytes(image)
            result = actions.add(backend, data, name, label.strip() or None)
        except actions.UserError as exc:
            gr.Warning(str(exc))
            return f"**Error:** {exc}", []
        gr.Info(f"Added as id {result.id}")
        raw = [{"id": result.id, "label": result.label, "name": result.name}]
        return f"**Added as id {result.id}**: it is in the index now and found by the next search.", raw

    def after_add(image: Any, k: Any, only: Any, added: str) -> tuple[Any, str, Any, Any]:
        gallery, found, raw = on_search(image, k, only)
        return gallery, f"{added}<br>{found}", raw, gr.update(choices=label_choices())  # a new label is offered

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\n{subtitle}")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(sources=["upload", "webcam", "clipboard"], type="filepath", label="Query image",
                                 height=280, elem_id="query-image")
                k = gr.Slider(1, actions.MAX_K, value=DEFAULT_K, step=1, label="k (number of results)")
                only = gr.Dropdown(label_choices(), value=actions.ANY_LABEL, label="Only results labelled",
                                   elem_id="label-filter")
                search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                with gr.Row():
                    label = gr.Textbox(label="Label for the added image (optional)", scale=2)
                    add_btn = gr.Button("Add this image to the index", scale=1, elem_id="add-button")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image, use the webcam, paste one, or click an example below.",
                                     elem_id="status")
                gallery = gr.Gallery(label="Nearest gallery images", columns=5, height="auto", object_fit="contain",
                                     elem_id="results")
                with gr.Accordion("Raw results", open=False):
                    raw = gr.JSON(label="ids, scores, labels")
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="Gallery examples (click one)",
                        examples_per_page=12, elem_id="examples")
        outputs = [gallery, status, raw]
        search_btn.click(on_search, [image, k, only], outputs, api_name="search", preprocess=False)
        image.change(on_search, [image, k, only], outputs, api_visibility="private", preprocess=False)
        k.release(on_search, [image, k, only], outputs, api_visibility="private", preprocess=False)
        only.input(on_search, [image, k, only], outputs, api_visibility="private", preprocess=False)
        add_btn.click(on_add, [image, label], [status, raw], api_name="add", preprocess=False).success(
            after_add, [image, k, only, status], [*outputs, only], api_visibility="private", preprocess=False
        )
    return app


def launch(app: Any, port: int, *, allowed_paths: Sequence[Path] = (), host: str = "127.0.0.1") -> str:
    """Start ``app`` in a background thread on ``host:port``; returns its URL."""
    quiet_gradio()
    app.queue(default_concurrency_limit=2)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False, quiet=True,
               show_error=True, inbrowser=False, ssr_mode=False, mcp_server=False,
               allowed_paths=[str(p) for p in allowed_paths],
               max_file_size=MAX_IMAGE_BYTES + 2**20, footer_links=["api"])
    return f"http://{host}:{port}/"
