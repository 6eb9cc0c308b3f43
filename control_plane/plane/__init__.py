"""The running plane's parts, each with a narrow interface; control_plane/app.py builds them and wires them.

- `publisher.py` (`Publisher`): what the Envoys are served: the xDS cache, the config and fleet
  last published, its weights, long uploads, ejections, lanes and hedging deadlines, the
  certificates as secrets, the Envoys' count.
- `state_keeper.py` (`StateKeeper`): what runtime changes change: the registry, the API keys, the
  admin tokens; kept in the state file or in etcd (changes, conflicts, another plane's state
  adopted, restore at start) and who leads.
- `drains.py` (`Drains`): draining a backend, resuming it, removing it, finishing drains.
- `in_flight.py` (`InFlightLimits`): the requests-in-flight limits' one home in the plane, and a
  map of the feature's other pieces.
- `load_loop.py` (`LoadLoop`): every round: observe, finish drains, expire secrets, count the
  Envoys, decide, publish.
- `tls.py` (`Tls`): the TLS files served and dialled with, loaded at start and watched.
- `operator_view.py` (`OperatorView`): operator/view.py's PlaneView over these parts.

No part is handed the plane: each gets the parts or the callables it uses, and data flows one
way, observe -> decide -> publish.
"""


class StartupError(RuntimeError):
    """A reason not to start, said plainly."""
