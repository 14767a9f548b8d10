"""The artifact formats every stage reads: the quant recipe and VC table (`recipe`) and the typed manifests of
exports and engine sets (`manifest`). Reading them imports no stage's heavy libraries."""
