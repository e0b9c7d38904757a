"""The interpreter: evaluate a model's jaxpr with adapted weights carried symbolically.

``core`` holds the loop and the rule table; each other module is one family of
rules (``dot``, ``shape``, ``control``, ``quantized``) or an entry point
(``trace``: fn to jaxpr; ``probe``: learn a kernel's axes). Importing this
package registers every rule.
"""

from jlora._src.interpret import concat as concat
from jlora._src.interpret import control as control
from jlora._src.interpret import conv as conv
from jlora._src.interpret import dot as dot
from jlora._src.interpret import gather as gather
from jlora._src.interpret import ragged as ragged
from jlora._src.interpret import shape as shape
from jlora._src.interpret import spmd as spmd
