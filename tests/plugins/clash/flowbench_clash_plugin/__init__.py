"""A plugin whose model names clash with a built-in's and with another plugin's (test fixture)."""

import dataclasses

from flowbench.models import MODELS

MAF_COPY = dataclasses.replace(MODELS["gaussian"], name="maf")
DEMO_COPY = dataclasses.replace(MODELS["gaussian"], name="demo-affine")
