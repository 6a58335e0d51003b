"""Train one step of TRL's own trainers on export files, the way a user would start:
`load_dataset("json", data_files=...)` handed unchanged to `DPOTrainer` or `SFTTrainer`.

    python -m tests.consumers.trl_train dpo=PAIRS.jsonl sft=CHAT.jsonl ...

The model is a one-layer Llama built from a config and the tokenizer a byte-level BPE trained
on the files themselves, both in a temporary directory: nothing is downloaded, and any text
tokenizes. Prints one JSON line per file (columns TRL saw, rows, the step's loss); exits 1 if
any trainer refuses a file. A separate process: TRL and torch are heavy to import, and their
warnings are theirs, not the test suite's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _tiny_model(directory: Path, texts: list[str]) -> str:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def main(argv: list[str]) -> int:
    from datasets import disable_progress_bars, load_dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    disable_progress_bars()
    runs = [arg.split("=", 1) for arg in argv]
    texts = [Path(path).read_text(encoding="utf-8") for _, path in runs]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny_model(Path(tmp) / "model", texts)
        for n, (kind, path) in enumerate(runs):
            data = load_dataset(
                "json", data_files=path, split="train", cache_dir=str(Path(tmp) / "hf")
            )
            common = {
                "output_dir": str(Path(tmp) / f"out-{n}"),
                "max_steps": 1,
                "per_device_train_batch_size": 2,
                "report_to": [],
                "use_cpu": True,
                "save_strategy": "no",
                "logging_steps": 1,
                # No truncation: ARTE's pairs carry the teacher's whole prompt, longer than
                # the default 1,024 tokens of this toy tokenizer (TRL would drop the row).
                "max_length": None,
            }
            try:
                if kind == "dpo":
                    trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data)
                else:
                    trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data)
                loss = trainer.train().training_loss
            except Exception as exc:  # the consumer refused the file: say why
                print(json.dumps({"kind": kind, "file": path, "error": repr(exc)}), flush=True)
                failed = True
                continue
            print(
                json.dumps(
                    {
                        "kind": kind,
                        "file": path,
                        "columns": data.column_names,
                        "rows": data.num_rows,
                        "loss": loss if math.isfinite(loss) else None,
                    }
                ),
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
