"""TVM backend: ``tvm:PRESET`` targets (see README.md here). Nothing is imported from TVM until used."""
