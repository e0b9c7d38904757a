"""The interpreter: evaluate a model's jaxpr with adapted weights carried symbolically.

``core`` holds the loop and the rule table; each other module is one family of
rules (``dot``, ``shape``, ``control``, ``quantized``) or an entry point
(``trace``: fn to jaxpr; ``probe``: learn a kernel's axes). Importing this
package registers every rule.
"""

from jlora.interpret import concat as concat  # noqa: F401  (registers its rules)
from jlora.interpret import control as control  # noqa: F401
from jlora.interpret import conv as conv  # noqa: F401
from jlora.interpret import dot as dot  # noqa: F401
from jlora.interpret import gather as gather  # noqa: F401
from jlora.interpret import ragged as ragged  # noqa: F401
from jlora.interpret import shape as shape  # noqa: F401
from jlora.interpret import spmd as spmd  # noqa: F401
