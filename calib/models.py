"""The model registry: a name -> how to run it (backend, weights, pipeline) and its default settings."""

from __future__ import annotations

from dataclasses import dataclass


class UnknownModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backend: str  # tiny (an embedded model, calib.tiny.model.EMBEDDED) | diffusers
    hub_id: str | None
    pipeline: str  # the diffusers pipeline class the weights belong to
    steps: int
    cfg: float
    size: tuple[int, int]  # (width, height)
    edit: bool  # takes a reference image
    description: str
    prompts: str  # the default prompt set, in the repository's prompts/
    lora: str | None = None  # a published LoRA the base weights run with ("hub repo/file"); record takes its local file (--lora-path)
    lightx2v_config: str | None = None  # LightX2V's own config for it (configs/qwen_image/...), for --backend lightx2v


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "tiny-qwen-image-edit", "tiny", None, "QwenImageEditPipeline", 20, 4.0, (48, 48), True,
            "embedded default: diffusers' Qwen-Image classes at 1.9M parameters, trained to edit shapes scenes, runs offline on a CPU "
            "(proves code paths; its edits are determined, so its schedules are easy)",
            "calib.jsonl",
        ),
        ModelSpec(
            "scenes-qwen-image-edit", "tiny", None, "QwenImageEditPipeline", 50, 4.0, (64, 64), True,
            "embedded evidence model: open-ended scene edits with many possible outcomes, as a real model's; 2.5M parameters, "
            "about 1 s per 50-step edit on a CPU thread", "scenes/calib.jsonl",
        ),
        ModelSpec(
            "scenes-qwen-image-edit-8step", "tiny", None, "QwenImageEditPipeline", 8, 1.0, (64, 64), True,
            "the scenes model distilled to 8 steps with CFG off, as Lightning is (calib.training.distill)", "scenes/calib.jsonl",
        ),
        ModelSpec(
            "scenes-qwen-image-edit-4step", "tiny", None, "QwenImageEditPipeline", 4, 1.0, (64, 64), True,
            "the scenes model distilled to 4 steps with CFG off", "scenes/calib.jsonl",
        ),
        ModelSpec(
            "qwen-image-edit", "diffusers", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 50, 4.0, (1024, 1024), True,
            "Qwen-Image-Edit (2508), 20B MMDiT", "edit.jsonl",
        ),
        ModelSpec(
            "qwen-image-edit-2509", "diffusers", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 40, 4.0, (1024, 1024), True,
            "Qwen-Image-Edit-2509, multi-image edit", "edit.jsonl",
        ),
        ModelSpec(
            "qwen-image-edit-2511", "diffusers", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 40, 4.0, (1024, 1024), True,
            "Qwen-Image-Edit-2511, zero_cond_t reference modulation", "edit.jsonl",
        ),
        ModelSpec(
            "qwen-image", "diffusers", "Qwen/Qwen-Image", "QwenImagePipeline", 50, 4.0, (1328, 1328), False,
            "Qwen-Image text-to-image", "t2i.jsonl",
        ),
        # Distilled: 8 steps, CFG off (one branch), the base weights with the published Lightning LoRA; LightX2V ships a config
        ModelSpec(
            "qwen-image-edit-2511-lightning", "diffusers", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 8, 1.0, (1024, 1024), True,
            "Qwen-Image-Edit-2511 distilled to 8 steps, CFG off", "edit.jsonl",
            lora="lightx2v/Qwen-Image-Edit-2511-Lightning/Qwen-Image-Edit-2511-Lightning-8steps-V1.0-fp32.safetensors",
            lightx2v_config="configs/qwen_image/qwen_image_i2i_2511_distill.json",
        ),
        ModelSpec(
            "qwen-image-2512-lightning", "diffusers", "Qwen/Qwen-Image-2512", "QwenImagePipeline", 8, 1.0, (1328, 1328), False,
            "Qwen-Image-2512 text-to-image distilled to 8 steps, CFG off", "t2i.jsonl",
            lora="lightx2v/Qwen-Image-2512-Lightning/Qwen-Image-2512-Lightning-8steps-V1.0-fp32.safetensors",
            lightx2v_config="configs/qwen_image/qwen_image_t2i_2512_distill.json",
        ),
    )
}

DEFAULT_MODEL = "tiny-qwen-image-edit"


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)} (see `teacal models`)") from None
