"""``tipstorch demo``: a gradio web page to look at what a model sees.

Tabs: zero-shot segmentation into typed labels, the 150 ADE20K classes of a DPT segmentation head, PCA
of the patch tokens, depth, surface normals and image-text similarity, all on one uploaded image. Every
failure (not an image, a decompression bomb, a huge image, empty labels, ...) becomes one message in the
page; the traceback goes to the server log only and the server keeps serving. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tipstorch.data.images import ImageFileError, open_image
from tipstorch.eval import dense_predict
from tipstorch.models.dense import DENSE_TASKS, DPTDecoder
from tipstorch.models.tips import TIPSModel
from tipstorch.viz import class_map_figure, depth_to_rgb, normals_to_rgb, segmentation_figure, side_by_side

LOG = logging.getLogger("tipstorch.cli.demo")
DEFAULT_LABELS = "sky, tree, road, building, person, car"
DEFAULT_TEXTS = "a photo of a street\na photo of a kitchen\na photo of a cat"


@dataclass
class DemoModel:
    """What the page runs: the model, its tokenizer, a DPT head per dense task and what they are."""

    model: TIPSModel
    tokenizer: Callable
    heads: dict[str, DPTDecoder]
    description: str  # the banner: which model (and heads) the page shows
    head_notes: dict[str, str]  # per task: where its head came from


class UserError(Exception):
    """A problem with what the user gave; its message is shown in the page as is."""


def _load(upload) -> Image.Image:
    """The uploaded file (gradio gives a path, or None) as an RGB image, or a UserError saying why not."""
    if upload is None:
        raise UserError("Upload an image first.")
    path = upload if isinstance(upload, str | os.PathLike) else getattr(upload, "name", upload)
    try:
        return open_image(path, name=Path(str(path)).name)
    except ImageFileError as error:
        raise UserError(f"Cannot use this upload: {error}") from error


def _safely(handler: Callable[..., tuple], outputs: int) -> Callable[..., tuple]:
    """Run ``handler``; on any error return (None, ..., message) so the page shows one line of text."""

    @functools.wraps(handler)
    def run(*args):
        try:
            return (*handler(*args), "")
        except (UserError, ValueError) as error:
            return (*([None] * outputs), f"**Error:** {error}")
        except Exception as error:  # noqa: BLE001 - the page must never show a traceback
            LOG.exception("demo handler %s failed", handler.__name__)
            return (
                *([None] * outputs),
                f"**Error:** the model failed on this input ({type(error).__name__}); see the server log",
            )

    return run


def _as_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


class DemoHandlers:
    """The page's callbacks; each returns its outputs (arrays/PIL images/dicts) and raises UserError."""

    def __init__(self, demo_model: DemoModel) -> None:
        self.demo = demo_model

    def preview(self, upload):
        return (_load(upload),)

    def segment(self, upload, labels_text: str):
        image = _load(upload)
        labels = [label for label in (labels_text or "").replace("\n", ",").split(",")]
        try:
            labels = dense_predict.clean_labels(labels)
        except ValueError as error:
            raise UserError("Type at least two different labels, separated by commas.") from error
        result = dense_predict.zero_shot_segmentation(self.demo.model, self.demo.tokenizer, image, labels)
        scores = result.scores()
        notes = [f"{scores[label]['area']:.0%}" for label in result.labels]
        figure = segmentation_figure(image, result.label_map, result.labels, notes)
        return figure, {label: round(values["area"], 4) for label, values in scores.items()}

    def classes(self, upload):
        image = _load(upload)
        head = self.demo.heads["segmentation"]
        names = dense_predict.segmentation_class_names(head.head.out_features)
        class_map = dense_predict.predict_segmentation(self.demo.model, head, image)
        areas = dense_predict.class_areas(class_map, names)
        rounded = {name: round(area, 4) for name, area in areas.items()}
        return class_map_figure(image, class_map, names), rounded

    def pca(self, upload, fg_threshold: float):
        image = _load(upload)
        threshold = float(fg_threshold) if fg_threshold and fg_threshold > 0 else None
        result = dense_predict.pca_map(self.demo.model, image, fg_threshold=threshold)
        colours = Image.fromarray(np.round(result.colours * 255).astype(np.uint8))
        return (side_by_side([image, colours], height=min(448, max(image.height, 224))),)

    def depth(self, upload):
        image = _load(upload)
        depth = dense_predict.predict_depth(self.demo.model, self.demo.heads["depth"], image)
        summary = f"depth {depth.min():.2f} - {depth.max():.2f} m; head: {self.demo.head_notes['depth']}"
        return _as_image(depth_to_rgb(depth)), summary

    def normals(self, upload):
        image = _load(upload)
        normals = dense_predict.predict_normals(self.demo.model, self.demo.heads["normals"], image)
        return _as_image(normals_to_rgb(normals)), f"head: {self.demo.head_notes['normals']}"

    def similarity(self, upload, texts_text: str):
        image = _load(upload)
        texts = [text for text in (texts_text or "").split("\n")]
        try:
            texts = dense_predict.clean_labels(texts, minimum=1)
        except ValueError as error:
            raise UserError("Type at least one text, one per line.") from error
        result = dense_predict.image_text_similarity(self.demo.model, self.demo.tokenizer, image, texts)
        table = [
            [text, round(float(g), 4), round(float(s), 4)]
            for text, g, s in zip(result.texts, result.global_cosine, result.spatial_cosine, strict=True)
        ]
        return {text: float(p) for text, p in zip(result.texts, result.probabilities, strict=True)}, table


def build_demo(demo_model: DemoModel):
    """The gradio Blocks of the page (not launched)."""
    import gradio as gr

    handlers = DemoHandlers(demo_model)
    with gr.Blocks(title="tipstorch demo", analytics_enabled=False) as page:
        gr.Markdown(f"# tipstorch: what TIPS sees\n{demo_model.description}", elem_id="banner")
        with gr.Row():
            upload = gr.File(label="Image (PNG, JPEG, WebP, ...)", type="filepath", elem_id="upload")
            preview = gr.Image(label="Uploaded image", type="pil", interactive=False, elem_id="preview")
        upload_status = gr.Markdown(elem_id="upload-status")
        upload.change(_safely(handlers.preview, 1), [upload], [preview, upload_status])
        with gr.Tabs():
            with gr.Tab("Zero-shot segmentation", id="segment"):
                labels = gr.Textbox(value=DEFAULT_LABELS, label="Labels (comma-separated)", elem_id="labels")
                segment_button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                segment_image = gr.Image(label="Segmentation", type="pil", elem_id="segment-output")
                segment_scores = gr.Label(label="Area per label", elem_id="segment-scores")
                segment_status = gr.Markdown(elem_id="segment-status")
                segment_button.click(
                    _safely(handlers.segment, 2),
                    [upload, labels],
                    [segment_image, segment_scores, segment_status],
                )
            with gr.Tab("ADE20K classes", id="ade20k"):
                gr.Markdown(f"Head: {demo_model.head_notes['segmentation']}")
                classes_button = gr.Button(
                    "Segment into ADE20K classes", variant="primary", elem_id="ade20k-button"
                )
                classes_image = gr.Image(label="ADE20K classes", type="pil", elem_id="ade20k-output")
                classes_areas = gr.Label(label="Area per class", num_top_classes=10, elem_id="ade20k-scores")
                classes_status = gr.Markdown(elem_id="ade20k-status")
                classes_button.click(
                    _safely(handlers.classes, 2), [upload], [classes_image, classes_areas, classes_status]
                )
            with gr.Tab("PCA", id="pca"):
                threshold = gr.Slider(
                    0.0,
                    0.95,
                    value=0.0,
                    step=0.05,
                    elem_id="fg-threshold",
                    label="Foreground threshold on the first component (0 = off)",
                )
                pca_button = gr.Button("Show PCA", variant="primary", elem_id="pca-button")
                pca_image = gr.Image(
                    label="Image | first 3 principal components", type="pil", elem_id="pca-output"
                )
                pca_status = gr.Markdown(elem_id="pca-status")
                pca_button.click(_safely(handlers.pca, 1), [upload, threshold], [pca_image, pca_status])
            for task, title, label in (
                ("depth", "Depth", "Depth (near dark, far light)"),
                ("normals", "Normals", "Surface normals, RGB = (n + 1) / 2"),
            ):
                with gr.Tab(title, id=task):
                    gr.Markdown(f"Head: {demo_model.head_notes[task]}")
                    button = gr.Button(f"Predict {task}", variant="primary", elem_id=f"{task}-button")
                    picture = gr.Image(label=label, type="pil", elem_id=f"{task}-output")
                    summary, status = gr.Markdown(), gr.Markdown(elem_id=f"{task}-status")
                    button.click(_safely(getattr(handlers, task), 2), [upload], [picture, summary, status])
            with gr.Tab("Image-text similarity", id="similarity"):
                texts = gr.Textbox(
                    value=DEFAULT_TEXTS, lines=4, label="Texts (one per line)", elem_id="texts"
                )
                similarity_button = gr.Button("Compare", variant="primary", elem_id="similarity-button")
                similarity_label = gr.Label(
                    label="softmax(global CLS cosine / temperature)", elem_id="similarity-output"
                )
                similarity_table = gr.Dataframe(headers=["text", "global CLS cosine", "spatial CLS cosine"])
                similarity_status = gr.Markdown(elem_id="similarity-status")
                similarity_button.click(
                    _safely(handlers.similarity, 2),
                    [upload, texts],
                    [similarity_label, similarity_table, similarity_status],
                )
    return page


def launch(demo_model: DemoModel, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page on ``host:port`` (loopback by default); returns the Blocks when not blocking."""
    import gradio as gr

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    torch.set_grad_enabled(False)
    page = build_demo(demo_model)
    theme = gr.themes.Default(font=["Helvetica", "Arial", "sans-serif"], font_mono=["monospace"])
    page.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        show_error=False,
        quiet=not block,
        prevent_thread_lock=not block,
        max_file_size="100mb",
        theme=theme,
    )
    return page


MAIN_JOB_MODEL = Path("runs/tiny_cpu/final.safetensors")


def _random_head(model: TIPSModel, task: str) -> DPTDecoder:
    from tipstorch.models.dense import DPTConfig, create_dpt_decoder

    return create_dpt_decoder(task, DPTConfig(model.config.vision.embed_dim)).eval()


def prepare_demo_model(
    model_source: str | None = None,
    random: bool = False,
    head_sources: dict[str, str | None] | None = None,
    device: str = "cpu",
) -> DemoModel:
    """The model the page shows, with a banner saying which. No ``model_source``: the main job's
    ``runs/tiny_cpu/final.safetensors`` when it exists, else a random ``tips-tiny``. Heads per dense
    task: the given file, else the released head of a registered TIPSv2 model, else a random head."""
    from tipstorch.models.registry import list_dense_heads
    from tipstorch.weights.cache import DownloadError
    from tipstorch.weights.dense_heads import create_dense_head, load_dense_head
    from tipstorch.weights.factory import create_model, get_tokenizer, load_model

    if model_source is None and MAIN_JOB_MODEL.exists() and not random:
        model, description = (
            load_model(MAIN_JOB_MODEL, device=device),
            (
                f"**Model:** `{MAIN_JOB_MODEL}`, the main job's tiny TIPSv2 trained on the built-in scenes "
                "(expect sensible output on scene-like pictures only)."
            ),
        )
    elif model_source is None:
        model, description = (
            create_model("tips-tiny", device=device),
            (
                f"**Model:** a randomly initialised `tips-tiny` (no trained model at `{MAIN_JOB_MODEL}`): "
                "the pictures show the machinery, not meaningful predictions."
            ),
        )
    elif random:
        model = create_model(model_source, device=device)
        description = f"**Model:** `{model_source}` with random weights: predictions are not meaningful."
    else:
        model, description = load_model(model_source, device=device), f"**Model:** `{model_source}`."
    released = {task for name, task in list_dense_heads() if name == model_source and not random}
    heads, notes = {}, {}
    for task in DENSE_TASKS:
        source = (head_sources or {}).get(task)
        if source:
            heads[task], notes[task] = load_dense_head(source).to(device), f"`{source}`"
            continue
        if task in released:
            try:
                heads[task] = create_dense_head(model_source, task, device=device)
                notes[task] = f"the released {model_source} {task} head"
                continue
            except DownloadError as error:
                notes[task] = f"random, untrained (the released head could not be fetched: {error})"
        else:
            notes[task] = f"random, untrained (pass --{task}-head FILE for a trained head): not meaningful"
        heads[task] = _random_head(model, task).to(device)
    return DemoModel(model.eval(), get_tokenizer(model), heads, description, notes)
