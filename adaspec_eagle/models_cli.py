"""Subcommands about models: `list-models`."""

from __future__ import annotations


def cmd_list_models(args) -> int:
    from .models import list_models

    rows = list_models()
    width = max(len(r[0]) for r in rows)
    print(f"{'name':<{width}}  {'family':<9} loads from")
    for name, family, where in rows:
        print(f"{name:<{width}}  {family:<9} {where}")
    print("\nAlso accepted: any local model folder, a .gguf file, or a hub id such as 'org/name'.")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("list-models", help="print the model registry and where each model would load from")
    p.set_defaults(func=cmd_list_models)
