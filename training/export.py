"""`quietdepth-export SOURCE OUT_DIR`: write a model as an HF directory that transformers loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import SafetensorError

from modeldefs.pretrained import export_hf, load_pretrained, load_tokenizer, tokenizer_source
from modeldefs.quietstar import QuietStar


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quietdepth-export", description=__doc__)
    parser.add_argument("source", help="a quietdepth .ckpt, a .gguf file, an HF directory or hub id")
    parser.add_argument("out_dir", help="directory to write config.json + model.safetensors (+ tokenizer)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer source saved beside the weights (default: the source's own; for a .ckpt its "
                             "training data's) or 'none' to skip")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model files of an earlier export in out_dir")
    args = parser.parse_args(argv)
    earlier = sorted(p.name for p in Path(args.out_dir).glob("*")
                     if p.name == "config.json" or p.suffix == ".safetensors")
    if earlier and not args.overwrite:
        parser.exit(2, f"{parser.prog}: error: {args.out_dir} already holds an exported model ({', '.join(earlier)}); "
                       "give a new folder, or --overwrite to replace it\n")
    try:
        model = load_pretrained(args.source)
        tokenizer = None if args.tokenizer == "none" else load_tokenizer(args.tokenizer or tokenizer_source(args.source))
        out = export_hf(model, args.out_dir, tokenizer)
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: writing the weights failed (disk full)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    if isinstance(model, QuietStar):
        print("transformers loads the language model alone; quietdepth (init_from, quietdepth-eval) loads it with its "
              "thought tokens and mixing head, saved beside it")


if __name__ == "__main__":
    main()
