"""Dev mode: the whole product on this machine (emulated API, pod runner, operator)."""
