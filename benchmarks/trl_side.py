"""The TRL side of `trl_baseline.py`: runs inside the TRL venv (benchmarks/.venv-trl), not the
project's. Reads a JSON job, writes a JSON result; `trl_baseline.py` starts it as a subprocess.

    iteration  the pairwise iteration as users assemble it today: HF `generate` (k samples per
               prompt) -> the project's built-in reward (larpo_ray.tasks.binary_reward, stdlib
               only) -> best/worst pairs -> TRL `DPOTrainer` (sigmoid loss, its default shuffled
               order, reference forward inside each step), timed phase by phase.
    steps      TRL's DPO step on given token-id pairs in a given order (no shuffle, no re-tokenizing)
               with a given reference model: per-step loss (exact, from compute_loss) and wall time.

    benchmarks/.venv-trl/bin/python benchmarks/trl_side.py iteration JOB.json OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from larpo_ray.tasks import binary_reward  # noqa: E402  (stdlib only: same rule as the project)


def load(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def dpo_config(job: dict, out_dir: str, epochs: int) -> DPOConfig:
    """DPO with the project's learner settings: fp32, no gradient checkpointing (TRL defaults to
    bf16 and checkpointing), constant lr, AdamW(0.9, 0.999, 1e-8), no weight decay, clipping."""
    return DPOConfig(
        output_dir=out_dir,
        beta=job["beta"],
        learning_rate=job["lr"],
        num_train_epochs=epochs,
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=job["max_grad_norm"],
        seed=job["seed"],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=None,
    )


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


class RecordingDPOTrainer(DPOTrainer):
    """Records each step's loss unrounded (the logs are averages per logging window)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        self.step_losses.append(float(loss.detach()))
        return out


class FixedBatchDPOTrainer(RecordingDPOTrainer):
    """The given pairs as they are: token ids (no re-tokenizing, no EOS added) in the given order."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def train(trainer_cls, job: dict, model, ref_model, tokenizer, rows: list[dict], epochs: int) -> dict:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        trainer = trainer_cls(
            model=model,
            ref_model=ref_model,
            args=dpo_config(job, out_dir, epochs),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.step_losses = []
        init_s, start = time.perf_counter() - start, time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    return {
        "trainer_init_s": init_s,
        "train_s": train_s,
        "step_seconds": timer.seconds,
        "step_losses": trainer.step_losses,
    }


def generate(job: dict, model, tokenizer) -> list[list[list[int]]]:
    """k sampled responses per prompt (token ids, EOS kept), batched with left padding."""
    stop = sorted(
        {
            tokenizer.eos_token_id,
            *(
                [model.generation_config.eos_token_id]
                if isinstance(model.generation_config.eos_token_id, int)
                else model.generation_config.eos_token_id or []
            ),
        }
    )
    # top_k=0: transformers fills an unset top_k with 50, which the project's engines do not apply.
    config = GenerationConfig(
        do_sample=True,
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=0,
        max_new_tokens=job["max_new_tokens"],
        num_return_sequences=job["k"],
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(job["seed"])
    out = []
    for i in range(0, len(job["prompts"]), job["batch_prompts"]):
        ids = [p["token_ids"] for p in job["prompts"][i : i + job["batch_prompts"]]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)[:, width:]
        rows = [_trim(s.tolist(), set(stop)) for s in seqs]
        out += [rows[j * job["k"] : (j + 1) * job["k"]] for j in range(len(ids))]
    return out


def _trim(ids: list[int], stop: set[int]) -> list[int]:
    for n, tok in enumerate(ids):
        if tok in stop:
            return ids[: n + 1]
    return ids


def run_iteration(job: dict) -> dict:
    timing, t0 = {}, time.perf_counter()
    tokenizer, model = load(job["model_path"])
    timing["load"], start = time.perf_counter() - t0, time.perf_counter()
    responses = generate(job, model, tokenizer)
    timing["generate"], start = time.perf_counter() - start, time.perf_counter()
    texts = [[tokenizer.decode(r, skip_special_tokens=True) for r in rs] for rs in responses]
    rewards = [[binary_reward(t, p["answer"]) for t in ts] for p, ts in zip(job["prompts"], texts)]
    timing["score"], start = time.perf_counter() - start, time.perf_counter()
    rows = []  # best vs worst of each prompt whose samples differ in reward
    for p, ts, rs in zip(job["prompts"], texts, rewards):
        if max(rs) > min(rs):
            rows.append({"prompt": p["text"], "chosen": ts[rs.index(max(rs))], "rejected": ts[rs.index(min(rs))]})
    timing["pairs"] = time.perf_counter() - start
    result = {
        "n_prompts": len(responses),
        "n_samples": sum(map(len, responses)),
        "generated_tokens": sum(len(r) for rs in responses for r in rs),
        "n_pairs": len(rows),
        "mean_reward": sum(map(sum, rewards)) / max(1, sum(map(len, rewards))),
    }
    if rows:  # the reference model is a copy TRL makes of the policy (ref_model=None)
        trained = train(RecordingDPOTrainer, job, model, None, tokenizer, rows, job["epochs"])
        timing["trainer_init"], timing["train"] = trained.pop("trainer_init_s"), trained.pop("train_s")
        result.update(trained)
    timing["iteration"] = sum(v for k, v in timing.items() if k != "load")
    result["timing"] = timing
    result["samples"] = [
        {"prompt_ids": p["token_ids"], "responses": rs, "rewards": r}
        for p, rs, r in zip(job["prompts"], responses, rewards)
    ]
    return result


def run_steps(job: dict) -> dict:
    tokenizer, model = load(job["model_path"])
    ref_model = load(job["ref_path"])[1]
    rows = [
        {"prompt_ids": p["prompt_ids"], "chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]}
        for p in job["pairs"]
    ]
    return train(FixedBatchDPOTrainer, job, model, ref_model, tokenizer, rows, epochs=1)


def main() -> int:
    mode, job_path, out_path = sys.argv[1:4]
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    start = time.perf_counter()
    result = {"iteration": run_iteration, "steps": run_steps}[mode](job)
    result["process_s"] = time.perf_counter() - start
    import transformers
    import trl

    result["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
