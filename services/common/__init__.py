"""Pieces shared by every chatfleet service: errors, config helpers, gRPC server plumbing, logging."""
