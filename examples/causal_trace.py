"""Causal tracing (Meng et al. 2022) on SmolLM2: where does the model keep that the Eiffel Tower is in Paris?

pip install "neurotap[plot]" && python examples/causal_trace.py [OUT.png]
"""

import argparse

import neurotap as nt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", default="causal_trace.png", help="where the heat map is saved")
out = parser.parse_args().out
m = nt.load("smollm2-135m")
trace = nt.experiments.causal_trace(m, "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")
print(trace)
nt.plot.heatmap(trace, path=out)
