"""Train's model as an MLflow pyfunc model ("models from code"): stage train logs this file with the
model folder, and MLflow runs it to load the model, wherever mlflow, torch and transformers are
installed. So it imports nothing of lmforge, and is never imported by lmforge.

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/lmforge-classifier@champion")
    model.predict(pd.DataFrame({"text": ["Love it", "Broke in a day"]}))   # label, score per text
    # causal_lm: predict(pd.DataFrame({"prompt": [...]}), params={"max_new_tokens": 32}) -> text

Artifacts: ``model`` (the model folder: weights, tokenizer, labels.json or lm.json) and
``settings`` (JSON: ``max_length``, the rows' length in training: classification truncates to it).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

BATCH = 32  # texts per forward pass
MAX_NEW_TOKENS = 64  # causal_lm default; the `max_new_tokens` inference param overrides it


class TrainedModel(PythonModel):
    """classification: text -> label, score (the softmax of the label); causal_lm: prompt -> text
    (greedy, inside the training template when the model learned prompt/response pairs)."""

    def load_context(self, context) -> None:
        import transformers

        folder = Path(context.artifacts["model"])
        self.settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.lm = json.loads((folder / "lm.json").read_text()) if (folder / "lm.json").is_file() else None
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        auto = (transformers.AutoModelForCausalLM if self.lm
                else transformers.AutoModelForSequenceClassification)
        self.model = auto.from_pretrained(str(folder), use_safetensors=True).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        if self.lm:
            new = (params or {}).get("max_new_tokens", MAX_NEW_TOKENS)
            return pd.DataFrame({"text": [self._generate(str(p), int(new))
                                          for p in model_input["prompt"]]})
        return self._classify([str(t) for t in model_input["text"]])

    def _classify(self, texts: list[str]) -> pd.DataFrame:
        import torch

        labels, scores = [], []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = self.tokenizer(texts[start : start + BATCH], padding=True, truncation=True,
                                       max_length=self.settings["max_length"], return_tensors="pt")
                probs = self.model(**batch).logits.float().softmax(-1)  # (B, labels)
                best = probs.max(-1)
                labels += [self.model.config.id2label[int(i)] for i in best.indices]
                scores += best.values.tolist()
        return pd.DataFrame({"label": labels, "score": scores})

    def _generate(self, prompt: str, max_new_tokens: int) -> str:
        """As bento/prompts.py: the template's {prompt} slot filled, no special tokens added, the
        prompt's end kept when it is longer than the context leaves room for."""
        import torch

        template = self.lm.get("template")
        text = prompt if template is None else template.replace("{prompt}", prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # Positions the model attends over (GPT-2's n_positions answers to this name too): the
        # prompt's end and the new tokens must fit.
        context = getattr(self.model.config, "max_position_embeddings", None) or self.settings[
            "max_length"]
        max_new_tokens = max(min(max_new_tokens, context - 1), 1)
        ids = ids[-(context - max_new_tokens):] or [self.lm["eos_token_id"]]  # empty: a doc start
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.lm["pad_token_id"])
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


mlflow.models.set_model(TrainedModel())
