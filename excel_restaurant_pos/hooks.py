app_name = "excel_restaurant_pos"
app_title = "Excel Restaurant POS"
app_publisher = "Excel Restaurant POS Contributors"
app_description = "Restaurant POS for Frappe with a Bearer-token realtime push server"
app_email = "maintainers@excel-restaurant-pos.org"
app_license = "MIT"

# Bearer JWTs on Frappe's own API (and so for the realtime server's calls to
# frappe.realtime.get_user_info and the permission checks): see excel_restaurant_pos/auth.py.
auth_hooks = ["excel_restaurant_pos.auth.validate"]
