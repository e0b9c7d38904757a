"""The interpreter: evaluate a model's jaxpr with adapted weights carried symbolically.

``core`` holds the loop and the rule table; each other module is one family of
rules (``dot``, ``shape``, ``control``, ``quantized``) or an entry point
(``trace``: fn to jaxpr; ``probe``: learn a kernel's axes). Importing this
package registers every rule.
"""

from jlora.interpret import concat as concat
from jlora.interpret import control as control
from jlora.interpret import conv as conv
from jlora.interpret import dot as dot
from jlora.interpret import gather as gather
from jlora.interpret import ragged as ragged
from jlora.interpret import shape as shape
from jlora.interpret import spmd as spmd
