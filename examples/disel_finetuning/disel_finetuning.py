# Copyright 2026-present the HuggingFace Inc. team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Fine-tune a causal language model with DISeL (https://huggingface.co/papers/2605.19028), save it and reload it.

DISeL is a LoRA variant: `LoraConfig(use_disel=True)`. The gates train at their own learning rate, set up by
`peft.optimizers.create_disel_optimizer`. With `--load_in_4bit` the base model is loaded in 4-bit through bitsandbytes
and prepared with `prepare_model_for_kbit_training` (QLoRA); the adapter and its gates stay in float32.
"""

import argparse
import json
import random

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from peft import DiselConfig, LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.optimizers import create_disel_optimizer


def load_texts(data_path):
    """One example per line of a .txt file, or the "text" field of each line of a .jsonl file."""
    if data_path is None:
        # a small generated task, so that the script runs without any download besides the model
        rng = random.Random(0)
        pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(256)]
        return [f"Question: What is {a} plus {b}?\nAnswer: {a} + {b} = {a + b}." for a, b in pairs]
    with open(data_path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return [json.loads(line)["text"] for line in lines] if data_path.endswith(".jsonl") else lines


def load_base_model(args):
    """The base model in float32, or with --load_in_4bit its linear layers in 4-bit NF4 (bitsandbytes)."""
    if not args.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(args.base_model, dtype=torch.float32)
    # float32 compute runs on the CPU and on GPUs; on a GPU, bnb_4bit_compute_dtype=torch.bfloat16 is faster
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        args.base_model,
        dtype=torch.float32,
        quantization_config=quantization_config,
        device_map={"": 0} if torch.cuda.is_available() else "cpu",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id or local path")
    parser.add_argument("--data_path", default=None, help=".txt or .jsonl file; default: a small generated task")
    parser.add_argument("--output_dir", default="disel-output")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="learning rate of lora_A and lora_B")
    parser.add_argument("--gate_lr_ratio", type=float, default=5.0, help="gate learning rate / learning rate")
    parser.add_argument("--gate_bias_init", type=float, default=-3.0, help="initial gate bias, sigmoid(-3) ≈ 0.05")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--target_modules", default="all-linear", help='comma-separated names, or "all-linear"')
    parser.add_argument("--load_in_4bit", action="store_true", help="QLoRA: a 4-bit NF4 base model (bitsandbytes)")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = load_texts(args.data_path)
    dataset = [tokenizer(text + tokenizer.eos_token, truncation=True, max_length=args.cutoff_len) for text in texts]

    model = load_base_model(args)
    if args.load_in_4bit:
        # freezes the base, keeps the non-quantized weights in float32, enables gradient checkpointing
        model = prepare_model_for_kbit_training(model)
    target_modules = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        use_disel=DiselConfig(gate_bias_init=args.gate_bias_init),
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    # lora_A/lora_B at the learning rate, the gates at learning_rate * gate_lr_ratio without weight decay: the gate
    # learning rate is the main knob of the adaptation-versus-retention trade-off
    optimizer = create_disel_optimizer(
        model, optimizer_cls=torch.optim.AdamW, lr=args.learning_rate, gate_lr_ratio=args.gate_lr_ratio
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        optimizers=(optimizer, None),
    )
    trainer.train()

    # the gates are saved with lora_A and lora_B in adapter_model.safetensors (keys with `lora_disel_gate`)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    # reload: plain PeftModel.from_pretrained, nothing DISeL-specific
    base = load_base_model(args)  # the same 4-bit weights again with --load_in_4bit: quantization is deterministic
    if not args.load_in_4bit:
        base = base.to(model.device)
    reloaded = PeftModel.from_pretrained(base, args.output_dir)
    model.eval()
    reloaded.eval()
    prompt = texts[0].split("Answer:")[0] + "Answer:" if "Answer:" in texts[0] else texts[0][: len(texts[0]) // 2]
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        diff = (model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()
        output = reloaded.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"max |logits(trained) - logits(reloaded)| = {diff:.2e}")
    print(tokenizer.decode(output[0], skip_special_tokens=True))

    # which inputs open the gates: training examples versus unrelated text (each text alone, so no padding counts)
    openings = []
    gates = [m for name, m in reloaded.named_modules() if name.endswith("lora_disel_gate.default")]
    hooks = [gate.register_forward_hook(lambda m, i, logits: openings.append(torch.sigmoid(logits))) for gate in gates]
    other = ["The cat sat on the mat.", "Paris is the capital of France.", "It rained all day in the mountains."]
    for split, batch in (("training examples", texts[:8]), ("other text", other)):
        openings.clear()
        with torch.no_grad():
            for text in batch:
                reloaded(**tokenizer(text, return_tensors="pt").to(model.device))
        print(f"mean gate opening on {split}: {torch.cat([o.flatten() for o in openings]).mean():.4f}")
    for hook in hooks:
        hook.remove()
    # DISeL adapters cannot be merged (the update depends on the input): keep the PeftModel for inference


if __name__ == "__main__":
    main()
