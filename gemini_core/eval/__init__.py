"""Evaluation: held-out loss per domain, downstream tasks, and reading a run for inference.

Modules, in import order:
  settings         config.eval: what a run scores downstream (tasks, limits, split, generate)
  domain_loss      held-out loss and bits per byte per domain, on fixed windows
  loaded_run       a run's newest checkpoint, tokenizer and mesh, for inference (read-only)
  run_eval         `gx eval RUN --data DIR`: another folder of domains through a run
  metrics          acc / acc_norm, bits per byte, exact match, unbiased pass@k, standard errors
  task_templates   the template language of task declarations
  tasks            TaskSpec: downstream tasks declared as data; task files; shipped names
  task_library     the shipped declarations (gsm8k, humaneval, mbpp, arc_*, piqa, lambada, xcopa)
  task_examples    a task's records -> examples with their seeded few-shot contexts
  scoring          batched log-likelihood of (context, continuation) pairs; rolling windows
  sandbox          model-written programs run in isolation (namespaces, uid, limits)
  downstream       tasks scored on a model: `gx eval --tasks`, inside training, downstream.json
  needle           `gx eval --tasks needle`: passkey grid over lengths × depths, NLL by position
  completions      `gx generate RUN`: one prompt streamed, or a prompts file
  lm_eval_adapter  lm-evaluation-harness model "gx" (`gx lm-eval`; optional extra)
"""
