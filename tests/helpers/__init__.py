"""What several test files share: tiny configs, real faces, entry-point runs, launcher stand-ins."""
