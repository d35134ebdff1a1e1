"""Backend implementations; each fulfils the contract written on ``engine.backend.Backend``."""
