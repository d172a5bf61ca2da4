# Copyright 2026-present the HuggingFace Inc. team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Keeps the command of this build's first releases working (it converts a checkpoint of the DISeL reference package):

    python -m peft.tuners.lora.disel_reference SRC DST

The code is `disel_checkpoints`.
"""

import sys

from .disel_checkpoints import main


if __name__ == "__main__":
    sys.exit(main())
