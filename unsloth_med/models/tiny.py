"""Tiny random-weight VLMs with the real architectures, built offline in a few seconds.

`tiny:<family>` models let the test suite and the offline demo run the whole pipeline (load, LoRA or
full training, scoring, generation, merge, export, reload) on a CPU with no network. Each model has
the family's real `*ForConditionalGeneration` class and real processor, a byte-level BPE tokenizer
trained here on the recipes' own text (so the bone-fracture class names are short token sequences),
and the chat template from `families.py`. Everything is saved with `save_pretrained`, so
`AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)` reload
it like any hub checkpoint.

- mistral3: Mistral3ForConditionalGeneration = Pixtral vision tower + `ministral3` text model
  (the Ministral 3 layout). Sized so the offline demo can learn to classify the generated X-rays
  through the image on two CPU cores: 64 px images, 8 px patches, 2x2 patch merging -> 16 image
  tokens (+4 row-break/end tokens).
- mllama: MllamaForConditionalGeneration (Llama 3.2 Vision layout, cross-attention image path).
- qwen2_5_vl: Qwen2_5_VLForConditionalGeneration.
- gemma3: Gemma3ForConditionalGeneration (SigLIP vision tower, 64 px -> 16 image tokens).

Hidden sizes are multiples of 64 so bitsandbytes 4-bit blocks divide every weight. Weights are
saved in float32 (the CPU trains in fp32). Building is deterministic for a seed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..data.bone_break import CLASSES, INSTRUCTION
from ..errors import UnsupportedModelError
from .families import FAMILIES

TINY_FAMILIES = ("mistral3", "mllama", "qwen2_5_vl", "gemma3")
TINY_VERSION = 1  # bump when a tiny model's architecture, tokenizer or processor changes

VOCAB = 1024  # model vocabulary; the trained tokenizer is padded with reserved tokens up to it

# Mistral3 sizes: the offline demo's model. 64 px / 8 px patches = 8x8 patches, merged 2x2 -> 16 tokens.
MISTRAL3_IMAGE_SIZE = 64
MISTRAL3_PATCH_SIZE = 8
MISTRAL3_MERGE = 2
MISTRAL3_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=32)
MISTRAL3_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32)


# The demo's prompt (the bone_fracture recipe's instruction, from data/bone_break.py), trained into the tiny
# tokenizer so that it becomes few tokens.
DEMO_INSTRUCTION = INSTRUCTION
CAPTION_INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."


def _corpus() -> list[str]:
    """Text the tiny tokenizers learn from: the demo's instruction and labels, a caption prompt, radiology words."""
    general = (
        "The radiograph shows a fracture of the distal radius. No fracture is seen. "
        "Chest X-ray: heart size normal, lungs clear, no pleural effusion. No acute cardiopulmonary "
        "abnormality. Describe the image. Write the findings of this radiology image in one or two sentences. "
        "Is there a bone fracture in this X-ray? Answer yes or no. fractured not fractured the a an of in on "
        "with without left right femur tibia humerus ulna wrist ankle hand foot shoulder knee hip elbow spine "
        "rib skull CT MRI scan axial coronal sagittal contrast mass nodule opacity consolidation lesion. "
        "user assistant system user assistant system\n"
        "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?()[]-_/'\"\n"
    )
    # Labels appear both at the start of a line (the answer right after the prompt) and after a space
    # (inside the instruction), so both forms become few tokens.
    labels = "\n".join(CLASSES) + "\n" + " ".join(CLASSES) + "\n"
    general += CAPTION_INSTRUCTION + "\n"
    return [DEMO_INSTRUCTION + "\n"] * 20 + [labels] * 60 + [general] * 20


def _tokenizer(special_tokens: list[str], *, bos: str | None, eos: str, pad: str, unk: str | None,
               chat_template: str, named_tokens: dict[str, str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(special_tokens) - 16, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   **({"extra_special_tokens": named_tokens} if named_tokens else {}))
    if len(fast) < VOCAB:
        fast.add_tokens([f"<|reserved_{i}|>" for i in range(VOCAB - len(fast))], special_tokens=True)
    assert len(fast) == VOCAB, (len(fast), VOCAB)
    fast.chat_template = chat_template
    return fast


def _finish(model, processor, out_dir: Path, pad_id: int) -> None:
    import torch

    model = model.to(torch.float32)
    model.config.dtype = torch.float32
    model.generation_config.pad_token_id = pad_id
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _build_mistral3(out_dir: Path) -> None:
    from transformers import Ministral3Config, Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor

    try:  # the fast (torchvision) image processor when torchvision is there, else the PIL one
        import torchvision  # noqa: F401
        from transformers import PixtralImageProcessor as ImageProcessor
    except Exception:
        from transformers import PixtralImageProcessorPil as ImageProcessor

    template = FAMILIES["mistral3"].chat_template
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tok = _tokenizer(specials, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    size, patch, merge = MISTRAL3_IMAGE_SIZE, MISTRAL3_PATCH_SIZE, MISTRAL3_MERGE
    vision = dict(model_type="pixtral", patch_size=patch, image_size=size, num_channels=3, **MISTRAL3_VISION)
    text = Ministral3Config(
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        rope_parameters={"type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                         "original_max_position_embeddings": 256, "max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                         "llama_4_scaling_beta": 0.1},
        **MISTRAL3_TEXT,
    ).to_dict()
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=ids["[IMG]"],
                            spatial_merge_size=merge, vision_feature_layer=-1, multimodal_projector_bias=False,
                            tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["<s>"], ids["</s>"], ids["<pad>"]
    model = Mistral3ForConditionalGeneration(config)
    image_processor = ImageProcessor(size={"longest_edge": size}, patch_size={"height": patch, "width": patch})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                 spatial_merge_size=merge, chat_template=template)
    _finish(model, processor, out_dir, ids["<pad>"])


def _build_mllama(out_dir: Path) -> None:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

    try:
        import torchvision  # noqa: F401
        from transformers import MllamaImageProcessor as ImageProcessor
    except Exception:
        from transformers import MllamaImageProcessorPil as ImageProcessor

    template = FAMILIES["mllama"].chat_template
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>"]
    tok = _tokenizer(specials, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                     unk=None, chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    size, tiles = 56, 4
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_global_layers=1,
                  num_attention_heads=4, patch_size=14, image_size=size, max_num_tiles=tiles,
                  intermediate_layers_indices=[0, 1], vision_output_dim=128 * 3)
    # MllamaTextModel's embed_tokens has vocab_size + 8 rows, so <|image|> (id < VOCAB) is covered.
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                max_position_embeddings=4096, bos_token_id=ids["<|begin_of_text|>"],
                eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
                pad_token_id=ids["<|finetune_right_pad_id|>"], tie_word_embeddings=False)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=ids["<|image|>"])
    model = MllamaForConditionalGeneration(config)
    image_processor = ImageProcessor(size={"height": size, "width": size}, max_image_tiles=tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template)
    _finish(model, processor, out_dir, ids["<|finetune_right_pad_id|>"])


def _build_qwen2_5_vl(out_dir: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    video_processor = None
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor as ImageProcessor

        try:
            from transformers import Qwen2VLVideoProcessor

            video_processor = Qwen2VLVideoProcessor()
        except Exception:
            video_processor = None
    except Exception:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor

    template = FAMILIES["qwen2_5_vl"].chat_template
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, chat_template=template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1], in_chans=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, ids["<|im_end|>"], ids["<|endoftext|>"]
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                                     temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                    chat_template=template)
    _finish(model, processor, out_dir, ids["<|endoftext|>"])


def _build_gemma3(out_dir: Path) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    try:
        import torchvision  # noqa: F401
        from transformers import Gemma3ImageProcessor as ImageProcessor
    except Exception:
        from transformers import Gemma3ImageProcessorPil as ImageProcessor

    template = FAMILIES["gemma3"].chat_template
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    # Gemma3Processor reads the image markers from the tokenizer's named special tokens.
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(specials, bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>", chat_template=template,
                     named_tokens=named)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    # SigLIP on 64 px with 8 px patches: 8x8 patches, pooled to 4x4 -> 16 image tokens (as the mistral3 demo model).
    size, patch, image_tokens = 64, 8, 16
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=patch, image_size=size, vision_use_head=False)
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, sliding_window=512,
                bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                pad_token_id=ids["<pad>"], tie_word_embeddings=True)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=image_tokens,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(config)
    image_processor = ImageProcessor(size={"height": size, "width": size}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=template,
                                image_seq_length=image_tokens)
    _finish(model, processor, out_dir, ids["<pad>"])


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "gemma3": _build_gemma3,
    "mistral3": _build_mistral3,
    "mllama": _build_mllama,
    "qwen2_5_vl": _build_qwen2_5_vl,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise UnsupportedModelError(
            f"There is no tiny model for family '{family}'. Tiny families: {', '.join(TINY_FAMILIES)} "
            f"(use e.g. --model tiny:mistral3)."
        )


def build_tiny_model(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny random-weight model of `family` and its processor into out_dir; returns out_dir."""
    import torch

    _check_family(family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _BUILDERS[family](out_dir)
    return out_dir


def default_cache_dir() -> Path:
    return Path(os.environ.get("UNSLOTH_MED_CACHE", Path.home() / ".cache" / "unsloth_med"))


def tiny_model_path(family: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of the tiny `family` model, built once into the cache (atomically)."""
    _check_family(family)
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "tiny"
    path = root / f"{family}-v{TINY_VERSION}"
    if (path / "config.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-v{TINY_VERSION}-", dir=root))
    try:
        build_tiny_model(family, tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished first (the target exists and is not empty): use its copy.
            if not (path / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def describe(path: str | Path) -> dict[str, Any]:
    """Parameter counts of a tiny model folder (for logs and docs)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return {"params": sum(p.numel() for p in model.parameters()), "model_type": model.config.model_type}
