"""`python -m unimedvl_pipelines.evaluation {vqa,report,generation,i2i} ...`."""

import sys

from .cli import main

sys.exit(main())
