"""The whole recipe as one pipeline of steps: `gx run experiments/gemini_recipe.py`.

A recipe experiment's get_config returns a ConfigDict with `steps` (name -> step; they run and
are shown upstream first) and `params` (values steps refer to: the raw corpus, W&B on or off).
A step is
  kind        data_prepare | tokenizer | train | distill | sweep (load.STEP_KINDS)
  experiment  the experiment file the step runs, `path.py[:arg]`, relative to the recipe's folder
  config      fields over that experiment's own, nested as in its config (every field of the
              experiment can be overridden: --config.steps.<step>.config.<field>=value)
  inputs      fields filled from other steps' outputs, nested the same way; each leaf is a
              reference "ref:<step>.<output>" or "ref:params.<key>"
The references make a DAG. A step's fingerprint hashes its resolved config (the references in
place of the values they bring) and its inputs' fingerprints, so a changed field reruns that
step and exactly the steps downstream of it. Under every step is an in-process library call
that itself reuses finished work by content (a prepared data root, a cached tokenizer, a done
run, a done sweep trial): a rerun step costs only what really changed.

State: <runs root>/recipes/<recipe>/<step>.json, written atomically: state (queued | running |
done | failed), pid, host, fingerprint, the config and the input values that produced it, its
outputs, start, end, error. A step is up to date when it is done, its fingerprint matches, its
outputs are still there, and its inputs' values are the upstream steps' current outputs. A step
marked running whose process is gone (killed, crashed, the machine lost) is interrupted, not
trusted: it reruns, and its run resumes from its checkpoints. One run of a recipe at a time:
it holds <runs root>/recipes/<recipe>/.lock while it runs.

`--force STEP` redoes STEP's own work (a run retrained from scratch, a data root rebuilt, a
sweep's fit redone over its trial runs, which are runs of their own and reused when done). The
steps downstream of it rerun only if its outputs changed: a byte-identical data root, or a
retrained run with the same final eval metrics, leaves them up to date.

Modules, each importing only those before it: tree (plain nested data), config (the typed
recipe), refs (references and their order), kinds and sweep_step (what each kind of step does),
load (experiment file -> RecipeConfig), graph (steps resolved: references checked, ordered,
fingerprinted), state (state files, the lock, `gx ls`), decide (run or up to date, and why),
pipeline (run, dry run).
"""

from gx.recipe.load import is_recipe
from gx.recipe.pipeline import main
from gx.recipe.state import format_states

__all__ = ["format_states", "is_recipe", "main"]
