"""Our exported heads in SGLang's own model classes (run in the SGLang venv; see scripts/engines.sh).

SGLang's serving stack needs CUDA kernels; its model classes and loaders do not. For each head (WORK/export/
sglang-NAME) this builds SGLang's `LlamaForCausalLMEagle` / `LlamaForCausalLMEagle3` from the exported config,
fills every parameter with NaN, runs SGLang's own `load_weights` on the exported file, and checks:
  - every parameter was written (no NaN left), except the ones SGLang takes from the target at run time (the
    embedding; EAGLE-1's lm_head), and each equals the exported tensor (q/k/v and gate/up stacked as SGLang
    stacks them);
  - SGLang reads no attention bias the file lacks and none it has (the `bias` key read as attention bias);
  - the draft forward, run through SGLang's modules (its fc, fused qkv_proj, rotary embedding, o_proj, RMSNorms,
    fused gate_up_proj and SiluAndMul, down_proj, EAGLE-3's norm, lm_head and hot-token map; only the paged
    attention kernel is replaced by plain causal attention), gives our head's hidden states and logits on the
    teacher-forced positions `prepare.py` wrote (WORK/logits/NAME.safetensors).
Writes WORK/sglang.json; exit 1 on a failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS = ("kd", "kd-bias", "e3", "e3-full")
ATOL = 1e-4


def init_sglang(model_path: str):
    """One CPU process as SGLang's whole parallel world (gloo)."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path=model_path, device="cpu", tp_size=1), role="test",
            ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=None))
    port = 29500 + os.getpid() % 1000
    parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                distributed_init_method=f"tcp://127.0.0.1:{port}")
    parallel_state.initialize_model_parallel(backend="gloo")
    import sglang.srt.layers.rotary_embedding.base as rope_base

    rope_base._is_cpu = True  # build the rotary embedding without its CUDA kernel; forward_native is what runs


def attention(layer, x, positions):
    """SGLang's attention modules with plain causal attention in place of its paged kernel."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb.forward_native(positions, q, k)
    t = x.shape[0]
    q = q.view(t, attn.num_heads, attn.head_dim).transpose(0, 1)
    k = k.view(t, attn.num_kv_heads, attn.head_dim).transpose(0, 1)
    v = v.view(t, attn.num_kv_heads, attn.head_dim).transpose(0, 1)
    rep = attn.num_heads // attn.num_kv_heads
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0), is_causal=True)
    out, _ = attn.o_proj(out.transpose(0, 1).reshape(t, -1))
    return out


def mlp(layer, x):
    gate_up, _ = layer.mlp.gate_up_proj(x)
    out, _ = layer.mlp.down_proj(layer.mlp.act_fn.forward_native(gate_up))
    return out


def draft_forward(model, eagle3: bool, ids, features, embed):
    """(T,) ids, (T, F) target features -> (T, H) hidden states before the final norm, as SGLang computes them."""
    positions = torch.arange(ids.shape[0])
    layer = model.model.layers[0]
    emb = embed[ids]
    if not eagle3:
        h = model.model.fc(torch.cat([emb, features], dim=-1))
        h = attention(layer, h, positions) + h  # layer 0: no input norm (SGLang deletes it)
        return mlp(layer, layer.post_attention_layernorm.forward_native(h)) + h
    hidden = model.model.fc(features)
    residual = hidden
    x = torch.cat([layer.input_layernorm.forward_native(emb), layer.hidden_norm.forward_native(hidden)], dim=-1)
    out = attention(layer, x, positions)
    normed, residual = layer.post_attention_layernorm.forward_native(out, residual)
    return mlp(layer, normed) + residual


def check(name: str, work: Path, target_embed: torch.Tensor, folder: Path | None = None) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = folder or work / "export" / f"sglang-{name}"
    config = AutoConfig.from_pretrained(folder)
    eagle3 = config.architectures[0] == "LlamaForCausalLMEagle3"
    if eagle3:
        from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3 as cls
    else:
        from sglang.srt.models.llama_eagle import LlamaForCausalLMEagle as cls
    torch.set_default_dtype(torch.float32)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    exported = load_file(str(folder / "model.safetensors"))
    model.load_weights(list(exported.items()))
    params = dict(model.named_parameters())
    from_target = {"model.embed_tokens.weight"} | (set() if eagle3 else {"lm_head.weight"})
    unloaded = sorted(n for n, p in params.items() if n not in from_target and torch.isnan(p).any())
    prefix, own = "model.layers.0.", "midlayer." if eagle3 else "layers.0."
    stacked = {prefix + "self_attn.qkv_proj": ["q_proj", "k_proj", "v_proj"], prefix + "mlp.gate_up_proj":
               ["gate_proj", "up_proj"]}
    differ = []
    for key, parts in stacked.items():
        for kind in ("weight", "bias"):
            names = [own + ("self_attn." if "qkv" in key else "mlp.") + p + "." + kind for p in parts]
            if f"{key}.{kind}" in params or any(n in exported for n in names):
                want = torch.cat([exported[n] for n in names]) if all(n in exported for n in names) else None
                got = params.get(f"{key}.{kind}")
                if want is None or got is None or not torch.equal(got.detach(), want):
                    differ.append(f"{key}.{kind}")
    for n, t in exported.items():
        if any(s in n for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "d2t", "t2d")):
            continue
        mapped = n.replace("midlayer.", "layers.0.")
        mapped = mapped if mapped in params else "model." + mapped
        if mapped not in params or not torch.equal(params[mapped].detach(), t):
            differ.append(n)
    attn_biases = sorted(n for n in params if "self_attn" in n and n.endswith(".bias"))
    ref = load_file(str(work / "logits" / f"{name}.safetensors"))
    ids, feats = ref["input_ids"][0], ref["features"][0]
    with torch.no_grad():
        hidden = draft_forward(model, eagle3, ids, feats, target_embed)
        if eagle3:
            logits = model.lm_head.weight @ model.model.norm.forward_native(hidden).T
            logits = logits.T
        else:
            logits = hidden @ target_embed.T  # SGLang shares the target's lm_head (tied in SmolLM2)
    hidden_gap = (hidden - ref["hidden"][0]).abs().max().item()
    logit_gap = (logits - ref["logits"][0]).abs().max().item()
    same_top1 = torch.equal(logits.argmax(-1), ref["logits"][0].argmax(-1))
    hot = model.hot_token_id if eagle3 else None
    if eagle3 and "d2t" in exported:
        hot_ok = hot is not None and torch.equal(hot, exported["d2t"] + torch.arange(exported["d2t"].numel()))
    else:
        hot_ok = hot is None  # whole vocabulary: no map
    row = {"unloaded": unloaded, "differ": differ, "attention_biases": attn_biases, "hidden_max_abs_diff": hidden_gap,
           "logits_max_abs_diff": logit_gap, "same_top1": same_top1, "hot_token_map_ok": hot_ok,
           "positions": int(ids.numel())}
    bias_expected = "layers.0.self_attn.o_proj.bias" in exported
    row["ok"] = (not unloaded and not differ and bool(attn_biases) == bias_expected and hidden_gap < ATOL
                 and logit_gap < 10 * ATOL and same_top1 and hot_ok)
    return row


def main() -> int:
    work = Path(sys.argv[1])
    import sglang
    from safetensors import safe_open

    init_sglang(str(work / "target"))
    index = json.loads((work / "target" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    with safe_open(str(work / "target" / shard), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight").float()
    report = {"engine": "sglang", "version": sglang.__version__, "tolerance": ATOL, "heads": {}}
    for name in HEADS:
        if not (work / "export" / f"sglang-{name}").exists():
            continue
        row = check(name, work, embed)
        report["heads"][name] = row
        print(f"sglang {name}: parameters not loaded {row['unloaded'] or 'none'}, differing {row['differ'] or 'none'}, "
              f"attention biases {row['attention_biases'] or 'none'}; over {row['positions']} positions max |diff| "
              f"hidden {row['hidden_max_abs_diff']:.2e}, logits {row['logits_max_abs_diff']:.2e}, same top-1 "
              f"{row['same_top1']}, hot-token map ok {row['hot_token_map_ok']}: {'OK' if row['ok'] else 'FAIL'}",
              flush=True)
    if "kd" in report["heads"]:  # negative control: the EAGLE-1 export as it was, config "bias": true
        import shutil
        broken = work / "export" / "sglang-kd-bias-true"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(work / "export" / "sglang-kd", broken)
        cfg = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**cfg, "bias": True}))
        row = check("kd", work, embed, broken)
        shutil.rmtree(broken)
        report["negative_control"] = {"config": '"bias": true', "caught": not row["ok"],
                                      "attention_biases_built": row["attention_biases"]}
        print(f"sglang negative control (the old export's \"bias\": true): SGLang builds "
              f"{row['attention_biases']}; the check {'catches it' if not row['ok'] else 'DOES NOT catch it'}")
    (work / "sglang.json").write_text(json.dumps(report, indent=2))
    ok = bool(report["heads"]) and all(r["ok"] for r in report["heads"].values())
    ok &= report.get("negative_control", {}).get("caught", True)
    print("sglang: all checks passed" if ok else "sglang: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
