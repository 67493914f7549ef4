"""LoRA presets (per-expert targeting), adapter save / load / merge, QLoRA on CPU, adapter cards and Hub upload calls."""

import re

import pytest
import torch

from modeling_unimedvl import UniMedVLForConditionalGeneration
from unimedvl_training.lora import adapter_model_card, add_lora, load_adapter, load_quantized_model, lora_config, push_adapter_to_hub


def _model(converted_dir):
    return UniMedVLForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32)


def _lora_modules(peft_model):
    prefix = "base_model.model."
    return {n[len(prefix):].split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}


def _expected(layers, names):
    return {f"model.language_model.layers.{i}.{name}" for i in range(layers) for name in names}


UND = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GEN = ["self_attn.q_proj_moe_gen", "self_attn.k_proj_moe_gen", "self_attn.v_proj_moe_gen", "self_attn.o_proj_moe_gen",
       "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj"]


def test_presets_target_exactly_one_expert(converted_dir):
    layers = 2
    assert _lora_modules(add_lora(_model(converted_dir), lora_config("und", r=2))) == _expected(layers, UND)
    assert _lora_modules(add_lora(_model(converted_dir), lora_config("gen", r=2))) == _expected(layers, GEN)
    assert _lora_modules(add_lora(_model(converted_dir), lora_config("both", r=2))) == _expected(layers, UND + GEN)
    vision = _lora_modules(add_lora(_model(converted_dir), lora_config("vision", r=2)))
    assert {"model.connector.fc1", "model.connector.fc2", "model.vision_tower.encoder.layers.1.self_attn.out_proj"} <= vision
    assert all(re.match(r"model\.(connector|vision_tower\.encoder\.layers)\.", name) for name in vision) and len(vision) == 14
    heads = add_lora(_model(converted_dir), lora_config(["gen", "heads"], r=2))
    assert _lora_modules(heads) == _expected(layers, GEN) | {"model.time_embedder.linear_1", "model.time_embedder.linear_2"}
    trainable_full = {n for n, p in heads.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable_full == {f"base_model.model.{m}.modules_to_save.default.{k}" for m in ("llm2vae", "model.vae2llm") for k in ("weight", "bias")}
    with pytest.raises(ValueError, match="Unknown LoRA preset"):
        lora_config("decoder")


def test_adapter_save_load_merge_unload(converted_dir, tmp_path):
    torch.manual_seed(0)
    peft_model = add_lora(_model(converted_dir), lora_config(["und", "heads"], r=4, init_lora_weights=False)).eval()
    ids = torch.tensor([[600, 20, 21, 22, 601, 600]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        base = _model(converted_dir)(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(_model(converted_dir), str(tmp_path / "adapter"))
    merged = load_adapter(_model(converted_dir), str(tmp_path / "adapter")).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)
        unloaded = reloaded.unload()
        torch.testing.assert_close(unloaded(input_ids=ids).logits, base, atol=1e-6, rtol=1e-5)
    assert type(merged) is UniMedVLForConditionalGeneration
    assert not any("lora_" in name for name, _ in merged.named_parameters())


def test_qlora_forward_backward_on_cpu(converted_dir):
    import bitsandbytes as bnb

    model = load_quantized_model(str(converted_dir))
    attention = model.model.language_model.layers[0].self_attn
    assert isinstance(attention.q_proj, bnb.nn.Linear4bit) and isinstance(attention.q_proj_moe_gen, bnb.nn.Linear4bit)
    assert attention.q_proj.weight.quant_type == "nf4"
    for name in ("lm_head", "llm2vae"):
        assert type(getattr(model, name)) is torch.nn.Linear
    assert type(model.model.vae2llm) is torch.nn.Linear and type(model.model.time_embedder.linear_1) is torch.nn.Linear
    peft_model = add_lora(model, lora_config("both", r=4))
    ids = torch.tensor([[600, 30, 31, 32, 33, 601]])
    latents = torch.randn(4, 64)
    block = torch.tensor([[602, 605, 605, 605, 605, 603]])
    out = peft_model(input_ids=torch.cat([ids, block], 1), labels=torch.cat([ids, torch.full_like(block, -100)], 1),
                     latents=latents, latent_grid_hw=torch.tensor([[2, 2]]), latent_timesteps=torch.tensor([0.5]))
    loss = out.loss + out.velocity.pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("q_proj_moe_gen.lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("mlp.down_proj.lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())


class _RecordingHubApi:
    """Records the calls that `push_adapter_to_hub` makes instead of sending them to the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        import os

        self.calls.append(("upload_folder", {**kwargs, "files": sorted(os.listdir(kwargs["folder_path"]))}))
        with open(os.path.join(kwargs["folder_path"], "README.md")) as handle:
            self.readme = handle.read()
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"


def test_adapter_card_and_push_call(converted_dir):
    peft_model = add_lora(_model(converted_dir), lora_config(["gen", "heads"], r=4, lora_alpha=8))
    card = adapter_model_card(peft_model, "me/unimedvl-sr-lora", ["gen", "heads"], "General-Medical-AI/UniMedVL", datasets=["my/private"])
    text = str(card)
    assert card.data.base_model == "General-Medical-AI/UniMedVL" and card.data.library_name == "peft"
    assert {"unimedvl", "lora", "lora-gen", "lora-heads"} <= set(card.data.tags)
    assert "LoRA rank / alpha / dropout: 4 / 8 / 0.05" in text and "Fully trained modules: llm2vae, vae2llm" in text
    assert 'PeftModel.from_pretrained(base, "me/unimedvl-sr-lora")' in text and "Not a medical device" in text

    api = _RecordingHubApi()
    url = push_adapter_to_hub(peft_model, "me/unimedvl-sr-lora", ["gen", "heads"], "General-Medical-AI/UniMedVL", api=api, private=True,
                              datasets=["my/private"])
    assert url == "https://huggingface.co/me/unimedvl-sr-lora/commit/abc"
    assert api.calls[0] == ("create_repo", {"repo_id": "me/unimedvl-sr-lora", "private": True, "exist_ok": True, "repo_type": "model"})
    name, kwargs = api.calls[1]
    assert name == "upload_folder" and kwargs["repo_id"] == "me/unimedvl-sr-lora" and kwargs["repo_type"] == "model"
    assert kwargs["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert api.readme.strip() == text.strip() and "- my/private" in api.readme


def test_plain_target_modules_reach_the_understanding_expert_and_siglip(converted_dir):
    from peft import LoraConfig, get_peft_model

    from unimedvl_training.lora import GENERATION_EXPERT_MODULES, UNDERSTANDING_EXPERT_MODULES

    plain = _lora_modules(get_peft_model(_model(converted_dir), LoraConfig(r=2, target_modules=UNDERSTANDING_EXPERT_MODULES)))
    siglip = {f"model.vision_tower.encoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"}
    assert plain == _expected(2, UND[:4]) | siglip  # never the generation expert
    generation = _lora_modules(get_peft_model(_model(converted_dir), LoraConfig(r=2, target_modules=GENERATION_EXPERT_MODULES)))
    assert generation == _expected(2, GEN[:4])


def test_saved_adapter_loads_with_peft_model_and_auto_peft_model(converted_dir, tmp_path):
    from peft import AutoPeftModel, PeftModel

    torch.manual_seed(0)
    peft_model = add_lora(_model(converted_dir), lora_config("und", r=4, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[600, 20, 21, 22, 601, 600]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        by_class = PeftModel.from_pretrained(_model(converted_dir), tmp_path / "adapter").eval()
        by_auto = AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["modeling_unimedvl"]).eval()
        torch.testing.assert_close(by_class(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(by_auto(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-5)
    assert type(by_auto.get_base_model()) is UniMedVLForConditionalGeneration


def test_qlora_defaults_follow_the_device(converted_dir, monkeypatch):
    import transformers

    seen = {}

    def record(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(UniMedVLForConditionalGeneration, "from_pretrained", record)
    for gpu, device_map, dtype in ((True, "auto", torch.bfloat16), (False, "cpu", torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        with pytest.raises(RuntimeError, match="recorded"):
            load_quantized_model(str(converted_dir))
        assert seen["device_map"] == device_map and seen["dtype"] == dtype
        assert isinstance(seen["quantization_config"], transformers.BitsAndBytesConfig)
        assert seen["quantization_config"].bnb_4bit_compute_dtype == dtype
