"""`adaspec-eagle demo`: the README's main job on its embedded default.

Trains a KD reference head and an AdaSPEC head for the bundled SmolLM2-135M-Instruct on a ShareGPT slice
(`adaspec_eagle/recipes/smollm2-135m.yaml`, also `recipes/heads/smollm2-135m.yaml`; about 11 minutes on a 2-core CPU; resumable: rerun to continue), prints each
head's held-out top-1 agreement with the target, then measures τ and speed of tree speculative decoding with
both heads (alone, and with 8 prompt-lookup tokens grafted onto their trees) against plain greedy decoding and
prompt lookup on held-out ShareGPT prompts, in one run.
"""

from __future__ import annotations

from pathlib import Path

from adaspec_eagle import AdaspecError
from adaspec_eagle.cli import main
from adaspec_eagle.config import HeadRecipe, load_recipe

# Shipped inside the package (recipes/heads/smollm2-135m.yaml in a checkout links to it), so the demo runs from
# any installation.
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m.yaml"


def cmd_demo(args) -> int:
    recipe = Path(args.recipe)
    if not recipe.is_file():
        raise AdaspecError(f"demo recipe {str(recipe)!r} not found: pass --recipe PATH (a head recipe, e.g. "
                           "recipes/heads/smollm2-135m.yaml in a checkout).")
    out = args.output_dir
    flags = ["--overwrite"] if args.overwrite else []
    code = main(["train-head", "--recipe", str(recipe), "--output-dir", out, *flags] + list(args.overrides))
    if code:
        return code
    if args.no_bench:
        return 0
    print("\nspeculative decoding with the two heads (greedy, held-out ShareGPT prompts):", flush=True)

    target = load_recipe(HeadRecipe, recipe, list(args.overrides)).target
    return main(["bench", "--target", target,
                 "--drafter", f"reference=head:{out}/reference", "--drafter", f"adaspec=head:{out}/adaspec",
                 "--suite", "sharegpt", "--num-prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
                 "--repeats", "1", "--warmup", "1", "--peers", "prompt_lookup", "--out", f"{out}/bench",
                 # the engine's own plain loop too: on a CPU its small-batch products alone beat transformers
                 "--baseline", "hf,engine",
                 # the tree budget each head pays off on this machine, measured first (CPU-trained heads accept
                 # little, and a CPU verifies each extra tree token at a visible cost)
                 "--depth", "4", "--topk", "4", "--total-tokens", "auto", "--lookup-tokens", "8"])


def register_cli(sub) -> None:
    p = sub.add_parser("demo", help="train a KD and an AdaSPEC head for the bundled SmolLM2-135M, then benchmark them",
                       description=__doc__)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="head recipe (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts for the benchmark")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace an --output-dir that holds a run of another "
                   "config (e.g. from an older recipe) instead of refusing it")
    p.add_argument("--no-bench", action="store_true", help="train and evaluate agreement only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.epochs=1")
    p.set_defaults(func=cmd_demo)
