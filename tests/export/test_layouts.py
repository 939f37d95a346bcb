"""Export to the EAGLE / EAGLE-3 / SGLang / vLLM layouts and import back: keys and shapes as the engines
load them, config fields as the engines read them, refusals, identical logits after a round trip, the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from adaspec_eagle import AdaspecError
from adaspec_eagle.cli import main
from adaspec_eagle.config import HeadConfig
from adaspec_eagle.export import export_head
from adaspec_eagle.models.heads import build_head, load_head, save_head
from adaspec_eagle.io import MARKER
from adaspec_eagle.models import TINY_VOCAB, target_forward_features, tiny_model

torch.set_num_threads(2)

# tiny llama target: hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocabulary 102; EAGLE-3 draft vocab 40
H, KV, I, V, VD = 64, 32, 128, TINY_VOCAB, 40

# The engines' layouts, written out: EAGLE-1/2 layer 0 (no input_layernorm, no lm_head, no final norm)
EAGLE1_LAYER = {
    "fc.weight": (H, 2 * H),
    "layers.0.self_attn.q_proj.weight": (H, H), "layers.0.self_attn.k_proj.weight": (KV, H),
    "layers.0.self_attn.v_proj.weight": (KV, H), "layers.0.self_attn.o_proj.weight": (H, H),
    "layers.0.mlp.gate_proj.weight": (I, H), "layers.0.mlp.up_proj.weight": (I, H),
    "layers.0.mlp.down_proj.weight": (H, I), "layers.0.post_attention_layernorm.weight": (H,),
}
EAGLE3_LAYER = {
    "fc.weight": (H, 3 * H),
    "midlayer.self_attn.q_proj.weight": (H, 2 * H), "midlayer.self_attn.k_proj.weight": (KV, 2 * H),
    "midlayer.self_attn.v_proj.weight": (KV, 2 * H), "midlayer.self_attn.o_proj.weight": (H, H),
    "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
    "midlayer.mlp.down_proj.weight": (H, I), "midlayer.hidden_norm.weight": (H,),
    "midlayer.input_layernorm.weight": (H,), "midlayer.post_attention_layernorm.weight": (H,),
    "norm.weight": (H,), "lm_head.weight": (VD, H), "d2t": (VD,), "t2d": (V,),
}
EXPECTED = {  # (format, head kind) -> keys and shapes, architecture, weight files
    ("eagle", "eagle1"): ({**EAGLE1_LAYER, "fc.bias": (H,)}, "LlamaForCausalLM", True),
    ("sglang", "eagle1"): ({**EAGLE1_LAYER, "fc.bias": (H,)}, "LlamaForCausalLMEagle", False),
    ("vllm", "eagle1"): (EAGLE1_LAYER, "LlamaForCausalLM", False),
    ("eagle3", "eagle3"): (EAGLE3_LAYER, "LlamaForCausalLMEagle3", True),
    ("sglang", "eagle3"): (EAGLE3_LAYER, "LlamaForCausalLMEagle3", False),
    ("vllm", "eagle3"): (EAGLE3_LAYER, "LlamaForCausalLMEagle3", False),
}
CONFIG_TYPES = {"hidden_size": int, "intermediate_size": int, "num_attention_heads": int, "num_key_value_heads": int,
                "head_dim": int, "num_hidden_layers": int, "vocab_size": int, "max_position_embeddings": int,
                "rms_norm_eps": float, "rope_theta": float, "hidden_act": str, "model_type": str, "bias": bool,
                "tie_word_embeddings": bool, "torch_dtype": str}


def trained_head(kind, fc_bias=True, seed=0):
    """A saved head whose every weight is non-trivial (norms and bias perturbed), and its target."""
    target = tiny_model("llama", seed=0)
    torch.manual_seed(seed)
    counts = torch.rand(V, generator=torch.Generator().manual_seed(seed))
    head = build_head(target, HeadConfig(kind=kind, draft_vocab_size=VD, fc_bias=fc_bias), token_counts=counts)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or name == "fc.bias":
                p.add_(0.3 * torch.randn_like(p))
    return target, head.eval()


def logits_of(head, target, seed=0):
    ids = torch.randint(5, V, (2, 10), generator=torch.Generator().manual_seed(seed))
    feats = target_forward_features(target, ids, eagle3_layers=True)
    with torch.no_grad():
        hidden_in = head.project(feats["fused"] if head.uses_fused else feats["features"])
        return head.logits(head(hidden_in[:, :-1], ids[:, 1:]))  # (2, 9, V)


@pytest.mark.parametrize("fmt,kind", list(EXPECTED))
def test_layout_keys_shapes_config_and_round_trip(tmp_path, fmt, kind):
    target, head = trained_head(kind, fc_bias=(fmt != "vllm"))
    src = save_head(head, tmp_path / "head", {"data": "sharegpt[:100]", "loss": "adaspec k=0.4", "tau": 2.75})
    out = export_head(src, fmt, tmp_path / fmt)
    keys, arch, has_bin = EXPECTED[(fmt, kind)]
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "model.safetensors", "README.md", MARKER} | ({"pytorch_model.bin"} if has_bin else set())
    state = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == keys
    if has_bin:
        binary = torch.load(out / "pytorch_model.bin", weights_only=True)
        assert binary.keys() == state.keys() and all(torch.equal(binary[k], state[k]) for k in state)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == V and cfg["hidden_size"] == H
    assert cfg["tie_word_embeddings"] is False and cfg["bias"] is (fmt == "eagle" and "fc.bias" in keys)
    assert "target_hidden_size" not in cfg  # equal to hidden_size: EAGLE then loads the target's embedding
    for key, tp in CONFIG_TYPES.items():
        assert isinstance(cfg[key], tp), (key, cfg[key])
    if kind == "eagle3":
        assert cfg["draft_vocab_size"] == VD and isinstance(cfg["draft_vocab_size"], int)
        assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
        assert "eagle_config" not in cfg  # default layers (2, N//2, N-3): every engine's default
    ident = cfg["adaspec"]["target"]
    assert ident["hidden_size"] == H and ident["vocab_size"] == V and ident["fingerprint"]
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "sharegpt[:100]" in card and "2.75" in card and arch in card
    loaded = load_head(out, target)
    torch.testing.assert_close(logits_of(loaded, target), logits_of(head, target), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_published_layouts_without_our_config_section_load(tmp_path, kind):
    """A head as EAGLE / SpecForge publish it: only pytorch_model.bin, a 'model.' key prefix, embed_tokens,
    a config without the adaspec section."""
    target, head = trained_head(kind)
    fmt = "eagle" if kind == "eagle1" else "eagle3"
    out = export_head(save_head(head, tmp_path / "h", {}), fmt, tmp_path / "pub", with_embeddings=True,
                      target="tiny-llama")
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert torch.equal(state["embed_tokens.weight"], target.get_input_embeddings().weight)
    torch.save({"model." + k: v for k, v in state.items()}, out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    cfg = json.loads((out / "config.json").read_text())
    del cfg["adaspec"]
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = load_head(out, target)
    assert loaded.kind == kind
    torch.testing.assert_close(logits_of(loaded, target), logits_of(head, target), atol=0, rtol=0)
    with pytest.raises(AdaspecError, match="hidden size"):
        load_head(out, tiny_model("llama", hidden_size=32))  # no recorded identity: still checked by shape
    with pytest.raises(AdaspecError, match="vocabulary"):
        load_head(out, tiny_model("llama", vocab_size=120))


def test_refusals(tmp_path):
    _, h1 = trained_head("eagle1")
    src1 = save_head(h1, tmp_path / "h1", {})
    with pytest.raises(AdaspecError, match="eagle3 layout needs"):
        export_head(src1, "eagle3", tmp_path / "x")
    _, h3 = trained_head("eagle3")
    with pytest.raises(AdaspecError, match="EAGLE-1/2 layout reads only"):
        export_head(save_head(h3, tmp_path / "h3", {}), "eagle", tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written on a refusal
    export_head(src1, "sglang", tmp_path / "ok")
    with pytest.raises(AdaspecError, match="not empty"):
        export_head(src1, "sglang", tmp_path / "ok")


def test_bias_policies(tmp_path):
    """A bias-free head gets zeros where SGLang needs fc.bias; a zero bias is dropped for vLLM."""
    target, nobias = trained_head("eagle1", fc_bias=False)
    sg = export_head(save_head(nobias, tmp_path / "nb", {}), "sglang", tmp_path / "sg")
    assert torch.equal(load_file(str(sg / "model.safetensors"))["fc.bias"], torch.zeros(H))
    torch.testing.assert_close(logits_of(load_head(sg, target), target), logits_of(nobias, target))
    _, zero = trained_head("eagle1")
    with torch.no_grad():
        zero.fc.bias.zero_()
    vl = export_head(save_head(zero, tmp_path / "z", {}), "vllm", tmp_path / "vl")
    assert "fc.bias" not in load_file(str(vl / "model.safetensors"))


def engine_reading(fmt, cfg):
    """The parameters each engine's loader builds from a config.json, including the keys it reads by accident:
    vLLM's and SGLang's Llama layer take `bias` (or `attention_bias`) as q/k/v/o biases, `qkv_bias` overriding
    q/k/v; EAGLE's EaModel builds the EAGLE-1 fc with `bias` (default true) and no attention biases."""
    if fmt == "eagle":
        qkv = cfg.get("qkv_bias", False)
        return {"fc": cfg.get("bias", True), "qkv": qkv, "o": False}
    attn = bool(cfg.get("attention_bias", False) or cfg.get("bias", False))
    return {"fc": fmt == "sglang", "qkv": cfg.get("qkv_bias", attn), "o": attn}


@pytest.mark.parametrize("fc_bias", [True, False])
@pytest.mark.parametrize("fmt", ["eagle", "sglang", "vllm"])
def test_engines_build_exactly_the_exported_parameters(tmp_path, fmt, fc_bias):
    """Every bias an engine would build from the exported config exists in the exported weights and vice versa:
    a bias the engine builds but the file lacks stays uninitialised in vLLM (NaN drafts, no error)."""
    _, head = trained_head("eagle1", fc_bias=fc_bias)
    out = export_head(save_head(head, tmp_path / "h", {}), fmt, tmp_path / fmt)
    state, cfg = load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())
    built = engine_reading(fmt, cfg)
    attn = "layers.0.self_attn."
    assert built["fc"] == ("fc.bias" in state)
    assert built["qkv"] == all(attn + n + ".bias" in state for n in ("q_proj", "k_proj", "v_proj"))
    assert built["o"] == (attn + "o_proj.bias" in state)
    assert not cfg["mlp_bias"] and not any(".mlp." in k and k.endswith("bias") for k in state)


def eagle1_layer_as_vllm_runs_it(state, cfg, emb, feats):
    """vLLM's EAGLE-1 forward, written from its llama_eagle.py with transformers' Llama layer: fc without bias,
    layer 0 without input norm, attention biases when the config asks for them, output = layer + residual."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    lcfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("adaspec", "architectures", "bias")})
    lcfg.attention_bias = bool(cfg.get("attention_bias") or cfg.get("bias"))
    layer = LlamaDecoderLayer(lcfg, layer_idx=0)
    layer.input_layernorm = torch.nn.Identity()
    layer.load_state_dict({k[len("layers.0."):]: v for k, v in state.items() if k.startswith("layers.0.")},
                          strict=True)
    fc = torch.nn.Linear(2 * H, H, bias=False)
    fc.weight.data = state["fc.weight"]
    h = fc(torch.cat([emb, feats], -1))
    pos = torch.arange(h.shape[1])[None]
    mask = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=LlamaRotaryEmbedding(lcfg)(h, pos))
    return out[0] if isinstance(out, tuple) else out


def test_vllm_fold_of_fc_bias_is_exact(tmp_path):
    """A head with a non-zero fc.bias exports to vLLM's bias-free fc with the bias folded into layer 0's
    attention biases; vLLM's forward on the export equals ours, and the export loads back to the same head."""
    target, head = trained_head("eagle1", fc_bias=True)
    assert head.fc.bias.abs().max() > 0.1
    out = export_head(save_head(head, tmp_path / "h", {}), "vllm", tmp_path / "vl")
    state, cfg = load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())
    assert "fc.bias" not in state and cfg["attention_bias"] is True and cfg["bias"] is False
    ids = torch.randint(5, V, (1, 10), generator=torch.Generator().manual_seed(3))
    feats = target_forward_features(target, ids)["features"]
    emb = target.get_input_embeddings()(ids)
    with torch.no_grad():
        ours = head(head.project(feats), ids)
    torch.testing.assert_close(eagle1_layer_as_vllm_runs_it(state, cfg, emb, feats), ours, atol=1e-5, rtol=1e-5)
    without = {k: v for k, v in state.items() if not k.endswith("_proj.bias")}  # the bug: bias simply dropped
    assert not torch.allclose(eagle1_layer_as_vllm_runs_it(without, {**cfg, "attention_bias": False}, emb, feats),
                              ours, atol=1e-3)
    torch.testing.assert_close(logits_of(load_head(out, target), target), logits_of(head, target), atol=1e-5,
                               rtol=1e-5)
    state["layers.0.self_attn.q_proj.bias"] += 0.1  # real attention biases, not a fold: refused, not misread
    from safetensors.torch import save_file
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(AdaspecError, match="not a folded fc bias"):
        load_head(out, target)


@pytest.mark.parametrize("fmt", ["eagle3", "sglang", "vllm"])
def test_eagle3_full_vocabulary_is_written_in_target_order(tmp_path, fmt):
    """A draft vocabulary that is the whole target vocabulary, here in a shuffled order (d2t not zero, as a
    foreign head may have it), is written with lm_head rows in target order and no d2t/t2d: vLLM refuses a d2t
    then, EAGLE ignores it."""
    target = tiny_model("llama", seed=0)
    full = build_head(target, HeadConfig(kind="eagle3", draft_vocab_size=V)).eval()
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))  # draft id i is target id perm[i]
    with torch.no_grad():
        full.lm_head.weight.copy_(torch.randn(V, H)[perm])
    full.set_draft_vocab(perm - torch.arange(V), torch.ones(V, dtype=torch.bool))
    head = full
    assert head.d2t.abs().sum() > 0 and head.t2d.all()
    out = export_head(save_head(head, tmp_path / "h", {}), fmt, tmp_path / fmt)
    state, cfg = load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())
    assert "d2t" not in state and "t2d" not in state and cfg["draft_vocab_size"] == cfg["vocab_size"] == V
    target_ids = torch.arange(V) + head.d2t
    assert torch.equal(state["lm_head.weight"][target_ids], head.lm_head.weight.detach())
    torch.testing.assert_close(logits_of(load_head(out, target), target), logits_of(head, target), atol=0, rtol=0)


def test_cli_export_and_errors(tmp_path, capsys):
    _, head = trained_head("eagle3")
    src = save_head(head, tmp_path / "head", {})
    assert main(["export", str(src), "--format", "vllm", "--out", str(tmp_path / "v")]) == 0
    assert "LlamaForCausalLMEagle3" in capsys.readouterr().out
    assert main(["export", str(src), "--format", "eagle", "--out", str(tmp_path / "e")]) == 2
    assert "EAGLE-1/2 layout" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--format", "vllm", "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(src), "--format", "sglang", "--out", str(tmp_path / "w"), "--with-embeddings"]) == 2
    assert "--target" in capsys.readouterr().err
    (src / "model.safetensors").write_bytes(b"{not a safetensors file")
    assert main(["export", str(src), "--format", "sglang", "--out", str(tmp_path / "c")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "w").exists()


def test_wrong_target_on_exported_head(tmp_path):
    _, head = trained_head("eagle1")
    out = export_head(save_head(head, tmp_path / "h", {}), "sglang", tmp_path / "sg")
    with pytest.raises(AdaspecError, match="hidden_size"):
        load_head(out, tiny_model("qwen2", hidden_size=32))
    with pytest.warns(UserWarning, match="fingerprint"):
        load_head(out, tiny_model("llama", seed=3))


@pytest.mark.slow
def test_real_smollm2_heads_export_round_trip(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :48]
    counts = torch.bincount(ids.flatten(), minlength=49152)
    head = build_head(model, HeadConfig(kind="eagle3", draft_vocab_size=512), token_counts=counts).eval()
    cfg = head.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (9, 3, 64, 1536)
    assert cfg.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert head.target_layer_ids == (2, 15, 27) and head.t2d[ids].all()  # every seen token is draftable
    eos = model.config.eos_token_id
    assert head.t2d[eos if isinstance(eos, int) else eos[0]]
    out = export_head(save_head(head, tmp_path / "h", {"data": "test"}), "sglang", tmp_path / "sg")
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 512
    loaded = load_head(out, model)
    feats = target_forward_features(model, ids, eagle3_layers=True)
    with torch.no_grad():
        a = head.logits(head(head.project(feats["fused"][:, :-1]), ids[:, 1:]))
        b = loaded.logits(loaded(loaded.project(feats["fused"][:, :-1]), ids[:, 1:]))
    assert a.shape == (1, 47, 49152)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_non_default_fused_layers_per_engine(tmp_path):
    """Engines default to HF hidden_states (2, N//2, N-3); other layers are written in each engine's numbering
    (vLLM: the layer the state enters, SGLang: the layer that produced it) and read back."""
    target, head = trained_head("eagle3")
    head.target_layer_ids = (0, 1, 2)  # the tiny target has 2 layers: default would be (2, 1, -1)
    src = save_head(head, tmp_path / "h", {})
    vl = json.loads((export_head(src, "vllm", tmp_path / "vl") / "config.json").read_text())
    assert vl["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    sg = export_head(src, "sglang", tmp_path / "sg")
    cfg = json.loads((sg / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 0, 1]
    with pytest.raises(AdaspecError, match="EaModel always fuses"):
        export_head(src, "eagle3", tmp_path / "e3")
    assert load_head(tmp_path / "vl", target).target_layer_ids == (0, 1, 2)
    del cfg["adaspec"]  # as SpecForge would publish it: read the SGLang way
    (sg / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="SGLang way"):
        assert load_head(sg, target).target_layer_ids == (0, 1, 2)


def test_card_commands_parse_with_our_cli(tmp_path):
    """The adaspec-eagle command an exported head's card gives is one our CLI accepts."""
    import re
    import shlex

    from adaspec_eagle.cli import build_parser

    _, head = trained_head("eagle1", fc_bias=False)
    src = save_head(head, tmp_path / "h", {})
    for fmt in ("eagle", "sglang", "vllm"):
        card = (export_head(src, fmt, tmp_path / fmt) / "README.md").read_text()
        command = re.search(r"`(adaspec-eagle generate [^`]*)`", card).group(1)
        args = build_parser().parse_args(shlex.split(command.replace("TARGET", "tiny-llama"))[1:])
        assert args.head == str(tmp_path / fmt) and args.target == "tiny-llama"
