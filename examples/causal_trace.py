"""Causal tracing (Meng et al. 2022) on SmolLM2: where does the model keep that the Eiffel Tower is in Paris?

pip install "neurotap[plot]" && python examples/causal_trace.py [OUT.png]
"""

import sys

import neurotap as nt

m = nt.load("smollm2-135m")
trace = nt.experiments.causal_trace(m, "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")
print(trace)
nt.plot.heatmap(trace, path=sys.argv[1] if len(sys.argv) > 1 else "causal_trace.png")
