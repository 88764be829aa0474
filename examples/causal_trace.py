"""Causal tracing (Meng et al. 2022) on SmolLM2: where does the model keep that the Eiffel Tower is in Paris?

pip install "neurotap[plot]" && python examples/causal_trace.py [OUT.png]
"""

import sys

import matplotlib.pyplot as plt

import neurotap as nt

m = nt.load("smollm2-135m")
trace = nt.experiments.causal_trace(m, "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")
plt.imshow(trace.values.T, cmap="Purples", aspect="auto")
plt.xticks(range(len(trace.points)), [p.split(".")[1] for p in trace.points], fontsize=6)
plt.yticks(range(len(trace.tokens)), trace.tokens)
plt.xlabel("layer whose output is restored"), plt.colorbar(label=trace.metric), plt.tight_layout()
plt.savefig(sys.argv[1] if len(sys.argv) > 1 else "causal_trace.png", dpi=150)
