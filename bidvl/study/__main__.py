"""`python -m bidvl.study STAGE ARGS...`: one stage of one run (bidvl/study/stages.py), in the
process the study runner starts for it."""

import sys

from bidvl.study.stages import stage_main

sys.exit(stage_main(sys.argv[1:]))
