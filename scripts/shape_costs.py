"""Step costs at a real model's shape with random weights (nothing downloaded): what a target forward of 1 / 16 /
64 / 128 tokens costs after a 256-token cache (decode and tree verification), what one EAGLE-1 head forward and a
whole dynamic draft tree cost, and what one training step of the head costs (frozen target forward + head
forward/backward + AdaSPEC loss against a reference head), through the package's own training loop, so it runs
under every `accelerate launch` config (DDP, ZeRO-2, ZeRO-3, FSDP).

    python scripts/shape_costs.py infer --shape phi-2 --device cuda
    python scripts/shape_costs.py train --shape phi-2 --batch 4 --length 2048
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1 scripts/shape_costs.py train

Each prints one JSON line (and appends it to --out). Random weights give the real step costs, not real
acceptance. Timings are medians of repeats after a warm-up, with CUDA synchronised. On a CPU in fp32 the engine's
forwards use `adaspec_eagle.engine.linear_routing` (small-batch linear layers where this machine measures them
faster); `ADASPEC_SMALL_BATCH_LINEAR=1` forces them for every row count, `=0` measures PyTorch's stock `F.linear`
(the JSON line says which, and what the default `auto` measured).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

# Published configs (the hub's config.json values that decide compute).
SHAPES = {
    "phi-2": ("phi", dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4,
                          max_position_embeddings=2048, tie_word_embeddings=False)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_target(shape: str, dtype: torch.dtype, device: str):
    """A random-weight causal LM at `shape`, frozen, in eval mode."""
    import transformers as tf

    family, kw = SHAPES[shape]
    cls = {"phi": tf.PhiConfig, "llama": tf.LlamaConfig}[family]
    cfg = cls(**kw, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.requires_grad_(False).eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_s(fn, device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cmd_infer(args) -> dict:
    from adaspec_eagle.engine import linear_routing
    from adaspec_eagle.config import HeadConfig, TreeConfig
    from adaspec_eagle.models.heads import build_head
    from adaspec_eagle.engine.speculative import HeadDrafter, measure_verify_cost
    from adaspec_eagle.engine.tree import build_tree

    dtype, device = DTYPES[args.dtype], args.device
    target = build_target(args.shape, dtype, device)
    sizes = [n - 1 for n in args.tokens]  # measure_verify_cost(n): the root + n draft tokens
    verify = measure_verify_cost(target, args.context, sizes, repeats=args.repeats)
    row = {f"forward_{n + 1}_ms": round(1e3 * s, 3) for n, s in verify.items()}
    # plain transformers greedy decoding of the same target (per token, launch overhead included)
    vocab = target.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    n_new = 32

    def hf_generate():
        target.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)

    row["hf_generate_ms_per_token"] = round(1e3 * _median_s(hf_generate, device, 3) / n_new, 3)
    # an EAGLE-1 head (fp32 on CPU, the target's dtype on a GPU) after a `context`-token prefix
    head = build_head(target, HeadConfig()).to(device=device,
                                               dtype=dtype if torch.device(device).type == "cuda" else torch.float32)
    drafter = HeadDrafter(head, draft_vocab=None)
    seq = prompt[0].cpu()
    features = torch.randn(args.context - 1, target.config.hidden_size, dtype=head.dtype, device=device)

    def prefill():
        drafter.reset(target)
        drafter.add_features(features)
        return drafter.root_logits(seq)

    with linear_routing.small_batch_linears(target, head):  # the head's products as the engine runs them
        root_logits = prefill()
        top = root_logits.float().topk(8).indices.cpu()

        def one_level():  # one head forward of 8 tree nodes (a dynamic tree's level) + its logits
            drafter.expand(top, torch.ones(8, dtype=torch.long), torch.full((8,), -1), torch.eye(8, dtype=torch.bool))
            drafter.commit(None, [0])  # drop them again
            drafter.tree_hidden = drafter.tree_hidden[:, :0]

        row["head_forward_8_ms"] = round(1e3 * _median_s(one_level, device, args.repeats), 3)
        tree = TreeConfig(depth=args.depth, topk=8, total_tokens=args.tree_tokens)

        def draft_tree():
            logits = prefill()
            build_tree(int(seq[-1]), logits, drafter.expand, tree)

        prefill_s = _median_s(prefill, device, args.repeats)
        row[f"draft_tree_d{args.depth}_ms"] = round(1e3 * (_median_s(draft_tree, device, args.repeats) - prefill_s), 3)
    row.update(shape=args.shape, dtype=args.dtype, device=_device_name(device), context=args.context,
               small_batch_linear=linear_routing.mode(), small_batch_calibrated=linear_routing.calibrations(),
               tree=f"depth {args.depth}, top-8, {args.tree_tokens} tokens")
    return row


def cmd_train(args) -> dict:
    from adaspec_eagle.config import HeadConfig, LossConfig, OptimConfig, TrainConfig
    from adaspec_eagle.training.features import pad_batch
    from adaspec_eagle.models.heads import build_head
    from adaspec_eagle.training.loop import make_accelerator, prepare_frozen, train
    from adaspec_eagle.training.head import head_loss, head_valid_mask

    tcfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, precision=args.dtype, save_every=10 ** 6,
                       log_every=1)
    acc = make_accelerator(tcfg)
    device = acc.device
    dtype = DTYPES[args.dtype]
    target = prepare_frozen(acc, build_target(args.shape, dtype, str(device)))
    torch.manual_seed(1)
    reference = build_head(target, HeadConfig()).to(device).requires_grad_(False).eval()
    vocab = SHAPES[args.shape][1]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompt = args.length // 4
    data = [{"input_ids": torch.randint(3, vocab, (args.length,), generator=g),
             "loss_mask": torch.arange(args.length) >= prompt} for _ in range(64)]
    loss_cfg = LossConfig(kind="adaspec", k=0.4)

    def loss_fn(model, batch, num_items):
        return head_loss(model, batch, target=target, loss_cfg=loss_cfg, reference=reference, num_items=num_items)

    def count_items(batch):
        return int(head_valid_mask(batch["loss_mask"], batch["attention_mask"]).sum())

    optim = OptimConfig(lr=1e-4, max_grad_norm=args.max_grad_norm)
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(collate=lambda s: pad_batch(s, 0), count_items=count_items, optim_cfg=optim, accelerator=acc,
                  progress=False)
        warm = TrainConfig(**{**tcfg.__dict__, "max_steps": 2})
        # a fresh head for each call: FSDP wraps the module it is given in place
        train(build_head(target, HeadConfig()), data, loss_fn, train_cfg=warm, out_dir=os.path.join(tmp, "warm"), **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        head = build_head(target, HeadConfig())
        run = train(head, data, loss_fn, train_cfg=tcfg, out_dir=os.path.join(tmp, "run"), **kw)
    losses = run["losses"]
    row = {"shape": args.shape, "dtype": args.dtype, "device": _device_name(device), "processes": acc.num_processes,
           "distributed": str(acc.distributed_type).split(".")[-1], "zero_stage": _zero_stage(acc),
           "batch": f"{args.batch} x {args.length}", "steps": run["steps"],
           "tokens_per_s": round(run["tokens_per_s"]), "s_per_step": round(run["seconds"] / max(run["steps"], 1), 4),
           "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
           "head_params_m": round(sum(getattr(p, "ds_numel", p.numel()) for p in head.parameters()) / 1e6, 1)}
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return row


def _zero_stage(acc):
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("infer", "train"):
        s = sub.add_parser(name)
        s.add_argument("--shape", choices=sorted(SHAPES), default="phi-2")
        s.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        s.add_argument("--out", default=None, help="append the JSON line to this file")
    i = sub.choices["infer"]
    i.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    i.add_argument("--context", type=int, default=256, help="cached tokens before the measured forward")
    i.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128], help="tokens per target forward")
    i.add_argument("--depth", type=int, default=6)
    i.add_argument("--tree-tokens", type=int, default=60)
    i.add_argument("--repeats", type=int, default=10)
    t = sub.choices["train"]
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--length", type=int, default=2048)
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--max-grad-norm", type=float, default=0.5, help="must equal a DeepSpeed config's gradient_clipping")
    args = p.parse_args()
    row = cmd_infer(args) if args.cmd == "infer" else cmd_train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
