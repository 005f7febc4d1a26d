import sys

from cai_ray.cli import main

sys.exit(main())
