"""An entry file whose import fails."""

import kvcal_no_such_module_for_tests  # noqa: F401

model = None
