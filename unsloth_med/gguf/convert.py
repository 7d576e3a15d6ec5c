"""HF folder -> text GGUF + mmproj GGUF with the pinned llama.cpp converter, and its fixes for our models.

Run in a subprocess (`python -m unsloth_med.gguf.convert --llama-cpp SRC --model DIR --text OUT --mmproj OUT`)
so the vendored `gguf-py` and `conversion/` package come first on sys.path, ahead of PyPI's older `gguf`.
Nothing in the llama.cpp folder is modified: the fixes are subclasses of the converter's classes, made here.

- SentencePiece only when there is a tokenizer.model (the converter imports `sentencepiece` before checking).
- BPE pre-tokenizer fallback: the converter recognises pre-tokenizers by hashing the tokens of a test string
  and refuses unknown hashes. A tokenizer trained locally (the tiny models, a custom vocabulary) has an unknown
  hash; when its tokenizer.json pre-tokenizer is the plain GPT-2 byte-level split, llama.cpp's `gpt-2`
  pre-tokenizer splits identically (the verification compares the token counts), so it is used.
- Projector mapping on shallow vision towers: the converter maps `multi_modal_projector.linear_{1,2}` /
  `merger.mlp.{0,2}` through a block-indexed name table sized by the vision tower's depth, so a tower of fewer
  than 3 layers fails with `Can not map tensor 'multi_modal_projector.linear_2.weight'`; the table is made
  at least 3 blocks deep.
- Pixtral [IMG_BREAK]: the mmproj pass drops every `language_model.*` tensor before the LLaVA converter can
  take the [IMG_BREAK] row of `embed_tokens`, so the mmproj silently lacked `v.token_embd.img_break`
  (llama.cpp: `unable to find tensor v.token_embd.img_break`); that one tensor is kept for the row.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

MIN_MAPPED_BLOCKS = 3  # projector layer indices go up to 2


def _gpt2_pre_tokenizer(model_dir: Path) -> bool:
    """True when tokenizer.json pre-tokenizes exactly like GPT-2 (ByteLevel with its regex, nothing else)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def _with_pre_tokenizer_fallback(cls):
    class PreTokenizerFallback(cls):
        model_arch = cls.model_arch  # the converter requires every subclass to name it

        def _set_vocab_sentencepiece(self, *args, **kwargs):
            # The converter tries SentencePiece first and falls back to tokenizer.json on FileNotFoundError, but it
            # imports `sentencepiece` before looking for tokenizer.model: without the package that is an ImportError.
            if not (Path(self.dir_model) / "tokenizer.model").is_file():
                raise FileNotFoundError(f"no tokenizer.model in {self.dir_model}")
            return super()._set_vocab_sentencepiece(*args, **kwargs)

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                if not _gpt2_pre_tokenizer(Path(self.dir_model)):
                    raise SystemExit(
                        f"llama.cpp does not know this model's BPE pre-tokenizer ({self.dir_model}/tokenizer.json), "
                        "and it is not the GPT-2 byte-level one: GGUF export cannot reproduce its tokenization. "
                        "Export merged-16bit weights instead.") from None
                logging.getLogger("unsloth_med.gguf").warning(
                    "Unknown BPE pre-tokenizer hash; tokenizer.json uses the GPT-2 byte-level split: using 'gpt-2'.")
                return "gpt-2"

    PreTokenizerFallback.__name__ = PreTokenizerFallback.__qualname__ = f"UnslothMed{cls.__name__}"
    return PreTokenizerFallback


def text_class(base):
    """The converter's text class for this architecture, with the pre-tokenizer fallback.

    Mistral3Model delegates everything to an inner model (`self.impl`) it builds itself; the fallback goes
    on that inner class (the outer one is built once more with it, which only re-reads the config and index).
    """
    if hasattr(base, "Ministral3Model"):
        class Mistral3WithFallback(base):
            model_arch = base.model_arch

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.impl = _with_pre_tokenizer_fallback(type(self.impl))(*args, **kwargs)

        return Mistral3WithFallback
    return _with_pre_tokenizer_fallback(base)


def mmproj_class(base, gguf):
    class MmprojFixes(base):
        model_arch = base.model_arch

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.block_count < MIN_MAPPED_BLOCKS:
                self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, MIN_MAPPED_BLOCKS)

        @classmethod
        def filter_tensors(cls, item):
            name, _ = item
            # LLaVA/Pixtral take the [IMG_BREAK] row of the text embeddings in modify_tensors.
            keep_for_break_row = "language_model." in name and name.endswith("embed_tokens.weight")
            if getattr(cls, "use_break_tok", False) and keep_for_break_row:
                return (name.replace("language_model.", ""), item[1])
            return super().filter_tensors(item)

    MmprojFixes.__name__ = MmprojFixes.__qualname__ = f"UnslothMed{base.__name__}"
    return MmprojFixes


def convert(llama_cpp: Path, model_dir: Path, text_out: Path, mmproj_out: Path, outtype: str) -> None:
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with torch.inference_mode():
        for model_type, out in ((ModelType.TEXT, text_out), (ModelType.MMPROJ, mmproj_out)):
            hparams = ModelBase.load_hparams(model_dir, False)
            arch = get_model_architecture(hparams, model_type)
            base = get_model_class(arch, mmproj=model_type == ModelType.MMPROJ)
            cls = mmproj_class(base, gguf) if model_type == ModelType.MMPROJ else text_class(base)
            instance = cls(model_dir, ftype, out, eager=False, model_name=None)
            instance.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="the llama.cpp source folder")
    parser.add_argument("--model", type=Path, required=True, help="HF model folder (merged weights + processor)")
    parser.add_argument("--text", type=Path, required=True, help="text GGUF to write")
    parser.add_argument("--mmproj", type=Path, required=True, help="mmproj GGUF to write")
    parser.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert(args.llama_cpp, args.model, args.text, args.mmproj, args.outtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
