"""The adapter API end to end on a tiny random LLaVA built from configs (CPU, seconds)."""

import tempfile

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from asymlora import AsymLoraConfig, from_pretrained, get_model


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=14)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=96)).eval()


def main() -> None:
    config = AsymLoraConfig(r=8, lora_alpha=16, num_experts=3, routing="task", task_names=["vqa", "caption", "count"])
    model = get_model(tiny_llava(), config)
    model.print_trainable_parameters()
    ids = torch.tensor([[1, 96, 96, 96, 96, 5, 6, 7]] * 3)
    pixels = torch.randn(3, 3, 28, 28)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(5):
        out = model(input_ids=ids, pixel_values=pixels, labels=ids, task_ids=torch.tensor([0, 2, 1]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {out.loss.item():.4f}")
    generated = model.generate(input_ids=ids, pixel_values=pixels, task_ids=["vqa", "count", "caption"],
                               max_new_tokens=4, do_sample=False)
    print("generated:", generated[:, ids.shape[1]:].tolist())
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = from_pretrained(tiny_llava(), folder)
        print("task names kept:", loaded.task_names)
        model.export_lora(task="count", path=f"{folder}/count")
        print("exported a PEFT LoRA folder for task 'count'")


if __name__ == "__main__":
    main()
