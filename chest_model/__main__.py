from .cli import main
from .entry import exit_with

exit_with(main())
