"""Subcommands about models: `list-models`."""

from __future__ import annotations

from adaspec_eagle.models import list_models


def cmd_list_models(args) -> int:
    rows = list_models()
    width = max(len(r[0]) for r in rows)
    print(f"{'name':<{width}}  {'family':<9} loads from")
    for name, family, where in rows:
        print(f"{name:<{width}}  {family:<9} {where}")
    print("\nAlso accepted: any local model folder, a .gguf file, a hub id such as 'org/name', and tiny random\n"
          "test models 'tiny-FAMILY[-sSEED][-lLAYERS]' (families: llama, phi, gpt_neox, qwen2, codegen).")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("list-models", help="print the model registry and where each model would load from")
    p.set_defaults(func=cmd_list_models)
