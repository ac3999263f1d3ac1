"""Pieces shared by every chatfleet service: errors, config, gRPC plumbing, logging."""
