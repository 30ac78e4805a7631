"""Pure domain: states, transitions, resource types, errors, names. No I/O."""
