"""The Remote Asset API's domain: qualifiers, downloads into the CAS, fetch and push."""
