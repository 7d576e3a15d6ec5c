"""Full-size model shapes with random weights, for memory and speed trials on machines that cannot download.

A "shape" is the exact architecture of a real checkpoint (layer counts, widths, heads, vocabulary,
rope settings, vision tower, projector) with randomly initialised weights, plus a processor whose
tokenizer has the real special-token ids and whose image processor has the real settings. Memory and
step time depend only on the shape, so trials on a shape are a faithful preview of the real model's
cost. Its answers are noise: the weights are random.

    python -m unsloth_med.models.shapes build ministral3-14b /tmp/models/ministral3-14b   (needs a GPU)
    python -m unsloth_med.models.shapes list

Shapes (values from the checkpoints' config.json; Ministral 3 also from NVIDIA Megatron-Bridge's
Ministral3ModelProvider{3B,14B}):
- ministral3-14b: mistralai/Ministral-3-14B-Instruct-2512. Text (ministral3): hidden 5120, 40 layers,
  MLP 16384, 32 heads / 8 kv heads, head_dim 128, vocab 131072, yarn rope (theta 1e9, factor 16,
  original 16384 positions, llama-4 attention scaling beta 0.1), 262144 positions, untied head.
  Vision (Pixtral): hidden 1024, 24 layers, MLP 4096, 16 heads, head_dim 64, patch 14, 1540 px,
  spatial merge 2, GELU projector without bias. 13.9B parameters.
- ministral3-3b: mistralai/Ministral-3-3B-Instruct-2512. Text hidden 3072, 26 layers, MLP 9216, rope
  theta 1e6, tied embeddings; same vision tower. ~3.8B parameters.
- llama32-11b-vision: meta-llama/Llama-3.2-11B-Vision-Instruct. Text: Llama 3.1 8B (hidden 4096, 40
  layers incl. 8 cross-attention layers at 3, 8, ..., 38, MLP 14336, 32/8 heads, vocab 128256 + the
  <|image|> row, llama3 rope scaling factor 8, theta 500000). Vision: 1280 wide, 32 + 8 global layers,
  560 px tiles, up to 4 tiles. 10.7B parameters.

Tokenizers: a small byte-level BPE (trained here on medical and instruction text) padded with
unreachable filler entries to the real vocabulary size, with the special tokens at their real ids
(Mistral "tekken": <unk>=0 <s>=1 </s>=2 [INST]=3 [/INST]=4 [IMG]=10 <pad>=11 [IMG_BREAK]=12 [IMG_END]=13
[SYSTEM_PROMPT]=17 [/SYSTEM_PROMPT]=18, 1000 control ids in all; Llama 3: <|begin_of_text|>=128000,
<|finetune_right_pad_id|>=128004, <|start_header_id|>=128006, <|end_header_id|>=128007,
<|eot_id|>=128009, <|image|>=128256). Text therefore tokenizes into more pieces than with the real
tokenizers (a few dozen extra tokens per sample); image token counts are exact.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BackendError, ConfigError

MARKER = "unsloth_med_shape.json"

CORPUS = (
    "You are an expert radiologist. Look at this X-ray and classify the bone fracture into exactly ONE of "
    "these classes: Avulsion fracture, Comminuted fracture, Fracture Dislocation, Greenstick fracture, "
    "Hairline Fracture, Impacted fracture, Longitudinal fracture, Oblique fracture, Pathological fracture, "
    "Spiral Fracture. Reply with ONLY the class name, exactly as written above: no explanations, no "
    "markdown, no punctuation. You are an expert radiographer. Describe accurately what you see in this "
    "image. Panoramic radiograph shows an osteolytic lesion in the right posterior maxilla with resorption "
    "of the floor of the maxillary sinus. Chest X-ray: heart size normal, lungs clear, no pleural effusion. "
    "Axial computed tomography scan of the abdomen and pelvis with contrast showing a mass in the left "
    "kidney. Magnetic resonance imaging of the brain, T2-weighted, showing hyperintense white matter "
    "lesions. The radiograph shows a fracture of the distal radius; no fracture is seen in the ulna. "
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?()[]-_/'\"\n"
) * 8

MISTRAL_NAMED_CONTROL = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
    13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]",
}
LLAMA3_NAMED_SPECIAL = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>",
}


# ----------------------------------------------------------------------------- tokenizers
def _bpe(vocab_size: int = 1500):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    ordered = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return ordered, merges


def _fast_tokenizer(before: list[str], bpe_tokens: list[str], merges, after: list[str], total: int,
                    **special_kwargs):
    """Ids: `before` (control tokens), the BPE pieces, fillers up to total - len(after), then `after`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in before + bpe_tokens:
        vocab.setdefault(t, len(vocab))
    i = 0
    while len(vocab) < total - len(after):
        vocab[f"<unused_filler_{i}>"] = len(vocab)  # unreachable by the merges: pads the id space only
        i += 1
    for t in after:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in before + after])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_kwargs)


def mistral_tokenizer():
    """131072 ids, the first 1000 control tokens at Mistral's (tekken) ids."""
    control = [MISTRAL_NAMED_CONTROL.get(i, f"<SPECIAL_{i}>") for i in range(1000)]
    pieces, merges = _bpe()
    tok = _fast_tokenizer(control, pieces, merges, [], 131072, bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>", pad_token="<pad>")
    want = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11,
            "[IMG_BREAK]": 12, "[IMG_END]": 13, "[SYSTEM_PROMPT]": 17, "[/SYSTEM_PROMPT]": 18}
    got = {t: tok.convert_tokens_to_ids(t) for t in want}
    assert got == want and len(tok) == 131072, (got, len(tok))
    return tok


def llama3_tokenizer():
    """128000 text ids, 256 special tokens at 128000..128255 in Llama 3's order, <|image|> = 128256."""
    specials, r = [], 0
    for k in range(256):
        if k in LLAMA3_NAMED_SPECIAL:
            specials.append(LLAMA3_NAMED_SPECIAL[k])
        else:
            specials.append(f"<|reserved_special_token_{r}|>")
            r += 1
    pieces, merges = _bpe()
    tok = _fast_tokenizer([], pieces, merges, specials + ["<|image|>"], 128257, bos_token="<|begin_of_text|>",
                          eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    want = {"<|begin_of_text|>": 128000, "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006,
            "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|image|>": 128256}
    got = {t: tok.convert_tokens_to_ids(t) for t in want}
    assert got == want and len(tok) == 128257, (got, len(tok))
    return tok


# ----------------------------------------------------------------------------- processors
def ministral3_processor():
    from transformers import PixtralProcessor

    from .families import MINISTRAL_TEMPLATE

    try:
        import torchvision  # noqa: F401
        from transformers import PixtralImageProcessor as ImageProcessor
    except Exception:  # transformers' PIL backend where torchvision is missing
        from transformers import PixtralImageProcessorPil as ImageProcessor
    image_processor = ImageProcessor(
        size={"longest_edge": 1540}, patch_size={"height": 14, "width": 14}, do_resize=True, do_rescale=True,
        do_normalize=True, do_convert_rgb=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    return PixtralProcessor(image_processor=image_processor, tokenizer=mistral_tokenizer(), patch_size=14,
                            spatial_merge_size=2, chat_template=MINISTRAL_TEMPLATE)


def llama32_vision_processor():
    from transformers import MllamaProcessor

    from .families import LLAMA32_VISION_TEMPLATE

    try:
        import torchvision  # noqa: F401
        from transformers import MllamaImageProcessor as ImageProcessor
    except Exception:
        from transformers import MllamaImageProcessorPil as ImageProcessor
    image_processor = ImageProcessor(size={"height": 560, "width": 560}, max_image_tiles=4,
                                     image_mean=[0.48145466, 0.4578275, 0.40821073],
                                     image_std=[0.26862954, 0.26130258, 0.27577711])
    return MllamaProcessor(image_processor=image_processor, tokenizer=llama3_tokenizer(),
                           chat_template=LLAMA32_VISION_TEMPLATE)


# ----------------------------------------------------------------------------- configs
def _pixtral_vision() -> dict[str, Any]:
    return dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, head_dim=64, num_channels=3, image_size=1540, patch_size=14,
                hidden_act="silu", attention_dropout=0.0, initializer_range=0.02,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _ministral3(hidden: int, layers: int, mlp: int, rope_theta: float, tied: bool):
    from transformers import Mistral3Config

    text = dict(model_type="ministral3", vocab_size=131072, hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                bos_token_id=1, eos_token_id=2, pad_token_id=11, initializer_range=0.02,
                rope_parameters={"type": "yarn", "rope_type": "yarn", "rope_theta": rope_theta, "factor": 16.0,
                                 "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                 "llama_4_scaling_beta": 0.1})
    config = Mistral3Config(vision_config=_pixtral_vision(), text_config=text, image_token_index=10,
                            projector_hidden_act="gelu", vision_feature_layer=-1, multimodal_projector_bias=False,
                            spatial_merge_size=2, tie_word_embeddings=tied)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 11
    return config


def ministral3_14b_config():
    return _ministral3(hidden=5120, layers=40, mlp=16384, rope_theta=1e9, tied=False)


def ministral3_3b_config():
    return _ministral3(hidden=3072, layers=26, mlp=9216, rope_theta=1e6, tied=True)


def llama32_11b_vision_config():
    from transformers import MllamaConfig

    vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                  attention_heads=16, num_channels=3, image_size=560, patch_size=14, max_num_tiles=4,
                  vision_output_dim=7680, intermediate_layers_indices=[3, 7, 15, 23, 30], norm_eps=1e-5,
                  supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
    text = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=128256)


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    mirrors: str  # the real checkpoint whose shape this is
    config: Callable[[], Any]
    processor: Callable[[], Any]
    params_b: float  # parameter count in billions, for checks and reports


SHAPES: dict[str, Shape] = {
    s.name: s for s in (
        Shape("ministral3-14b", "mistral3", "mistralai/Ministral-3-14B-Instruct-2512", ministral3_14b_config,
              ministral3_processor, 13.94),
        Shape("ministral3-3b", "mistral3", "mistralai/Ministral-3-3B-Instruct-2512", ministral3_3b_config,
              ministral3_processor, 3.85),
        Shape("llama32-11b-vision", "mllama", "meta-llama/Llama-3.2-11B-Vision-Instruct", llama32_11b_vision_config,
              llama32_vision_processor, 10.67),
    )
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ConfigError(f"Unknown model shape '{name}'. Shapes: {', '.join(SHAPES)}.")
    return SHAPES[name]


def count_parameters(config) -> int:
    """Parameters of a config's model, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def is_built(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def build(name: str, out_dir: str | Path, *, device: str = "cuda", seed: int = 0) -> dict:
    """Write a random-weight model of the shape (bf16 safetensors) and its processor to out_dir."""
    import torch
    from transformers import AutoModelForImageTextToText

    shape = get_shape(name)
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"Building the {name} shape needs a CUDA GPU (it is initialised there, in bf16).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    processor = shape.processor()
    config = shape.config()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    t1 = time.time()
    model.save_pretrained(out, max_shard_size="5GB")
    processor.save_pretrained(out)
    t2 = time.time()
    info = {
        "shape": name, "mirrors": shape.mirrors, "family": shape.family, "params": n_params,
        "params_b": round(n_params / 1e9, 3), "weights": "random (normal, std 0.02), bf16", "seed": seed,
        "init_s": round(t1 - t0, 1), "save_s": round(t2 - t1, 1),
        "folder_gib": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**30, 2),
    }
    (out / MARKER).write_text(json.dumps(info, indent=1))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return info


def ensure_built(name: str, root: str | Path) -> Path:
    """root/<name>, built in a separate process (so its GPU memory is freed) unless already there."""
    import subprocess

    folder = Path(root) / name
    if is_built(folder):
        return folder
    cmd = [sys.executable, "-m", "unsloth_med.models.shapes", "build", name, str(folder)]
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0 or not is_built(folder):
        raise BackendError(f"Building the {name} shape into {folder} failed (exit {proc.returncode}).")
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "list":
        for s in SHAPES.values():
            print(f"{s.name:<20} {s.family:<9} {s.params_b:>6.2f}B  mirrors {s.mirrors}")
        return 0
    if argv[0] == "build" and len(argv) >= 3:
        info = build(argv[1], argv[2], device=argv[3] if len(argv) > 3 else "cuda")
        print("SHAPE " + json.dumps(info), flush=True)
        return 0
    print("usage: python -m unsloth_med.models.shapes list | build NAME OUT_DIR [cuda|cpu]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
