"""Site data: image I/O and validation, the SiteStore, synthetic federations, folder import."""
