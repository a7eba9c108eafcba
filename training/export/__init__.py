"""Bundle export: the ONNX graphs and their parity check (``onnx_graphs``), the torch backend's
module specs and weights (``torch_files``), what a method hands over (``spec``), and the writer
that puts a verified bundle in place (``writer``). May import ``models`` and the training root."""
